//! The fused loss on wgpu: the same two passes as the CPU's, with only the per-row
//! log-sum-exp and target logits read back to weigh the rows on the host.

use super::{CHUNK_BYTES, HeadSaved, LmHeadKernel, Selection};
use crate::backend::{Wgpu, wbuf, wgpu_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::binary::BinaryKind;
use bft_kernels::cpu::lm_head::chunk_rows;
use bft_kernels::wgpu::ops as k;

impl LmHeadKernel for Wgpu {
    /// WGSL computes in f32: 16-bit heads are widened once per call.
    fn reads_bf16_head(&self, _: &Tensor, _: &Tensor) -> bool {
        false
    }

    fn head_forward(
        &self,
        x: &Tensor,
        head: &Tensor,
        sel: Selection<'_>,
        want_dx: bool,
    ) -> Result<(HeadSaved, Tensor)> {
        let (g, i) = wgpu_of(x)?;
        let (n, c) = ("lm_head_nll", sel.dims.hidden);
        let xs = k::gather(&g, wbuf(n, x)?, c, sel.rows)?;
        let chunk = chunk_rows(sel.dims.vocab, 4, CHUNK_BYTES);
        let f = k::head_forward(
            &g,
            sel.dims,
            chunk,
            (&xs, wbuf(n, head)?, sel.targets),
            want_dx,
        )?;
        let rows = sel.rows.len();
        let logp = k::binary(
            &g,
            BinaryKind::Sub,
            &f.target_logit,
            &f.lse,
            rows,
            rows.max(1),
        )?;
        let w = |b, shape: Vec<usize>| Tensor::from_wgpu(b, DType::F32, i, shape);
        let saved = HeadSaved {
            xs: w(xs, vec![rows, c]),
            unit: f.unit.map(|u| w(u, vec![rows, c])),
            lse: w(f.lse, vec![rows]),
        };
        Ok((saved, Tensor::from_wgpu(logp, DType::F32, i, [rows])))
    }

    fn head_backward(
        &self,
        saved: &HeadSaved,
        head: &Tensor,
        sel: Selection<'_>,
        coef: &Tensor,
        (need_dx, need_dw): (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gpu, i) = wgpu_of(&saved.xs)?;
        let (n, rows) = ("lm_head_nll", sel.rows.len());
        let (c, v) = (sel.dims.hidden, sel.dims.vocab);
        let coef = wbuf(n, coef)?;
        let dx = match (&saved.unit, need_dx) {
            (Some(unit), true) => {
                let scaled = k::scale_rows(&gpu, wbuf(n, unit)?, coef, rows * c, c)?;
                let dx = k::scatter_add(&gpu, &scaled, c, sel.rows, sel.n_all)?;
                Some(Tensor::from_wgpu(dx, DType::F32, i, [sel.n_all, c]))
            }
            _ => None,
        };
        let dw = if need_dw {
            let chunk = chunk_rows(v, 4, CHUNK_BYTES);
            let inputs = (wbuf(n, &saved.xs)?, wbuf(n, head)?, sel.targets);
            let lse = (wbuf(n, &saved.lse)?, coef);
            let dw = k::head_backward_weight(&gpu, sel.dims, chunk, inputs, lse)?;
            Some(Tensor::from_wgpu(dw, DType::F32, i, [v, c]))
        } else {
            None
        };
        Ok((dx, dw))
    }
}
