//! The fused loss on CUDA (`kernels/cuda/loss.cu` around cuBLAS): bf16 operands (f32 ones are
//! rounded once), f32 logits a chunk of rows at a time. Pass 1 keeps only each row's
//! log-sum-exp; the backward recomputes each chunk's logits for dX (`G W`, the target term
//! added in f32) and dW (`G^T X`, accumulated in f32 over the chunks).

use super::{CHUNK_BYTES, HeadSaved, LmHeadKernel, Selection};
use crate::backend::{Cuda, bf16_input, cbuf, cuda_of};
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::lm_head::chunk_rows;
use bft_kernels::cpu::matmul::GemmDims;
use bft_kernels::cuda::ops::{self, GemmTypes, Operand};
use bft_kernels::cuda::typed::{self, Float};
use bft_kernels::cuda::{Cuda as Device, DeviceBuffer};
use std::sync::Arc;

const BF16_TO_F32: GemmTypes = GemmTypes {
    operands: Float::Bf16,
    out: Float::F32,
};

impl LmHeadKernel for Cuda {
    fn reads_bf16_head(&self, x: &Tensor, head: &Tensor) -> bool {
        matches!(x.dtype(), DType::F32 | DType::BF16) && head.dtype() == DType::BF16
    }

    fn head_forward(
        &self,
        x: &Tensor,
        head: &Tensor,
        sel: Selection<'_>,
        _want_dx: bool,
    ) -> Result<(HeadSaved, Tensor)> {
        let (dev, i) = cuda_of(x)?;
        let (n, c, v) = (sel.rows.len(), sel.dims.hidden, sel.dims.vocab);
        let op = "lm_head_nll";
        let (xb, wb) = (bf16_input(x)?, bf16_input(head)?);
        let device_rows = dev.upload(bytemuck::cast_slice(sel.rows))?;
        // (n, C) bf16: only the rows with a target.
        let xs = ops::embedding_forward(&dev, 2, cbuf(op, &xb, DType::BF16)?, &device_rows, n, c)?;
        let targets = dev.upload(bytemuck::cast_slice(sel.targets))?;
        let (lse, tl) = (dev.alloc(4 * n)?, dev.alloc(4 * n)?);
        let w = cbuf(op, &wb, DType::BF16)?;
        for (r0, rows) in chunks(n, v) {
            let z = logits(&dev, &xs, w, (r0, rows), (c, v))?;
            ops::head_lse(&dev, &z, &targets, (&lse, &tl), (rows, v, r0))?;
        }
        // 1: Sub in `kernels/cuda/elementwise.cu`.
        let logp = typed::binary(&dev, Float::F32, 1, (&tl, &lse), n, n.max(1))?;
        let saved = HeadSaved {
            xs: Tensor::from_cuda(xs, DType::BF16, i, [n, c]),
            unit: None,
            lse: Tensor::from_cuda(lse, DType::F32, i, [n]),
        };
        Ok((saved, Tensor::from_cuda(logp, DType::F32, i, [n])))
    }

    fn head_backward(
        &self,
        saved: &HeadSaved,
        head: &Tensor,
        sel: Selection<'_>,
        coef: &Tensor,
        (need_dx, need_dw): (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dev, i) = cuda_of(&saved.xs)?;
        let (n, c, v) = (sel.rows.len(), sel.dims.hidden, sel.dims.vocab);
        let op = "lm_head_nll";
        let wb = bf16_input(head)?;
        let w = cbuf(op, &wb, DType::BF16)?;
        let xs = cbuf(op, &saved.xs, DType::BF16)?;
        let lse = cbuf(op, &saved.lse, DType::F32)?;
        let coef = cbuf(op, coef, DType::F32)?;
        let targets = dev.upload(bytemuck::cast_slice(sel.targets))?;
        // (n, C) f32 and (V, C) f32.
        let dxs = if need_dx {
            Some(dev.zeros(4 * n * c)?)
        } else {
            None
        };
        let dw = if need_dw {
            Some(dev.zeros(4 * v * c)?)
        } else {
            None
        };
        for (r0, rows) in chunks(n, v) {
            let z = logits(&dev, xs, w, (r0, rows), (c, v))?;
            if let Some(dxs) = &dxs {
                // dX = (coef softmax) W, then the target term -coef W[y] in f32.
                let g = ops::head_grad(&dev, &z, &targets, (lse, coef), (rows, v, r0), false)?;
                let dims = GemmDims {
                    batch: 1,
                    m: rows,
                    n: c,
                    k: v,
                };
                let ab = (Operand::new(&g, false), (Operand::new(w, false), true));
                ops::gemm_into(&dev, dims, ab, BF16_TO_F32, (dxs, r0 * c, false))?;
                ops::head_target_term(&dev, (dxs, r0 * c), w, &targets, coef, (rows, c, r0))?;
            }
            if let Some(dw) = &dw {
                // dW += G^T X over the chunk's rows, G = coef (softmax - onehot).
                let g = ops::head_grad(&dev, &z, &targets, (lse, coef), (rows, v, r0), true)?;
                let dims = GemmDims {
                    batch: 1,
                    m: v,
                    n: c,
                    k: rows,
                };
                let x = Operand {
                    buf: xs,
                    offset: r0 * c,
                    trans: false,
                };
                let ab = (Operand::new(&g, true), (x, true));
                ops::gemm_into(&dev, dims, ab, BF16_TO_F32, (dw, 0, true))?;
            }
        }
        // Rows without a target get zero gradient.
        let dx = match dxs {
            Some(dxs) => Some(ops::embedding_backward(&dev, &dxs, sel.rows, sel.n_all, c)?),
            None => None,
        };
        let f32_tensor = |b, shape: [usize; 2]| Tensor::from_cuda(b, DType::F32, i, shape);
        Ok((
            dx.map(|b| f32_tensor(b, [sel.n_all, c])),
            dw.map(|b| f32_tensor(b, [v, c])),
        ))
    }
}

/// `(first row, rows)` of each chunk of `n` rows whose logits over `vocab` fit `CHUNK_BYTES`.
fn chunks(n: usize, vocab: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk_rows(vocab, 4, CHUNK_BYTES).max(1);
    (0..n).step_by(chunk).map(move |r0| (r0, chunk.min(n - r0)))
}

/// `(rows, V)` f32 logits of rows `r0..r0 + rows` of `xs (n, C)` against `w (V, C)`, both bf16.
fn logits(
    dev: &Arc<Device>,
    xs: &DeviceBuffer,
    w: &DeviceBuffer,
    (r0, rows): (usize, usize),
    (c, v): (usize, usize),
) -> Result<DeviceBuffer> {
    let dims = GemmDims {
        batch: 1,
        m: rows,
        n: v,
        k: c,
    };
    let x = Operand {
        buf: xs,
        offset: r0 * c,
        trans: false,
    };
    let z = dev.alloc(4 * rows * v)?;
    ops::gemm_into(
        dev,
        dims,
        (x, (Operand::new(w, true), true)),
        BF16_TO_F32,
        (&z, 0, false),
    )?;
    Ok(z)
}
