use super::{CHUNK_BYTES, HeadSaved, LmHeadKernel, Selection};
use crate::backend::Cpu;
use crate::memory::Scratch;
use crate::ops::float_dispatch;
use crate::{DType, Result, Tensor};
use bft_kernels::cpu::embedding::{gather, scatter_add};
use bft_kernels::cpu::lm_head::{chunk_rows, lm_head_backward_head, lm_head_forward};
use bft_kernels::cpu::zeroed;

/// Words of the vocabulary per tile of logits in the forward pass: 2,048 words of a row are
/// 8 KiB, and a tile's product with W (k = 2,048) is one packed k-block of the bf16 kernel.
const VOCAB_TILE: usize = 2048;

impl LmHeadKernel for Cpu {
    /// f32 hidden states read a frozen bf16 head as stored where a bf16 kernel runs
    /// (AVX512-BF16, or AVX2 + FMA widening the head as it packs it).
    fn reads_bf16_head(&self, x: &Tensor, head: &Tensor) -> bool {
        x.dtype() == DType::F32
            && head.dtype() == DType::BF16
            && !head.is_tracked()
            && bft_kernels::cpu::bf16_gemm::supported()
    }

    fn head_forward(
        &self,
        x: &Tensor,
        head: &Tensor,
        sel: Selection<'_>,
        want_dx: bool,
    ) -> Result<(HeadSaved, Tensor)> {
        let (n, c, v) = (sel.rows.len(), sel.dims.hidden, sel.dims.vocab);
        float_dispatch!("lm_head_nll", x.dtype(), |T| {
            // (n, C): only the rows with a target.
            let mut xs = zeroed::<T>(n * c);
            gather(x.cpu::<T>("lm_head_nll")?, c, sel.rows, &mut xs);
            let (mut lse, mut tl) = (zeroed::<T>(n), zeroed::<T>(n));
            // Logits a tile of the vocabulary at a time, for as many rows as CHUNK_BYTES
            // holds (every row of a SmolLM2 batch: 864 rows of 2,048 words, 7 MiB).
            let tile = VOCAB_TILE.min(v);
            let chunk = chunk_rows(tile, std::mem::size_of::<T>(), CHUNK_BYTES);
            // The one vocabulary-sized buffer: a tile of logits, counted as engine memory.
            let mut z = Scratch::<T>::new(chunk.min(n) * tile);
            let mut unit = want_dx.then(|| zeroed::<T>(n * c));
            let (op, xr) = ("lm_head_nll", xs.as_slice());
            if head.dtype() == DType::BF16 {
                lm_head_forward(
                    sel.dims,
                    (chunk, tile),
                    (xr, head.cpu::<half::bf16>(op)?, sel.targets),
                    z.buf(),
                    &mut lse,
                    &mut tl,
                    unit.as_deref_mut(),
                );
            } else {
                lm_head_forward(
                    sel.dims,
                    (chunk, tile),
                    (xr, head.cpu::<T>(op)?, sel.targets),
                    z.buf(),
                    &mut lse,
                    &mut tl,
                    unit.as_deref_mut(),
                );
            }
            drop(z);
            let logprobs: Vec<T> = tl.iter().zip(&lse).map(|(&t, &l)| t - l).collect();
            let saved = HeadSaved {
                xs: Tensor::from_cpu(xs, [n, c]),
                unit: unit.map(|u| Tensor::from_cpu(u, [n, c])),
                lse: Tensor::from_cpu(lse, [n]),
            };
            Ok((saved, Tensor::from_cpu(logprobs, [n])))
        })
    }

    fn head_backward(
        &self,
        saved: &HeadSaved,
        head: &Tensor,
        sel: Selection<'_>,
        coef: &Tensor,
        (need_dx, need_dw): (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (c, v) = (sel.dims.hidden, sel.dims.vocab);
        float_dispatch!("lm_head_nll backward", saved.xs.dtype(), |T| {
            let n = "lm_head_nll";
            let coef = coef.cpu::<T>(n)?;
            let dx = match (&saved.unit, need_dx) {
                (Some(unit), true) => {
                    let mut dxs = unit.cpu::<T>(n)?.to_vec();
                    dxs.chunks_mut(c)
                        .zip(coef)
                        .for_each(|(row, &a)| row.iter_mut().for_each(|e| *e *= a));
                    // Rows without a target get zero gradient.
                    let mut dx = zeroed::<T>(sel.n_all * c);
                    scatter_add(&dxs, c, sel.rows, &mut dx);
                    Some(Tensor::from_cpu(dx, [sel.n_all, c]))
                }
                _ => None,
            };
            let dw = if need_dw {
                let mut dw = zeroed::<T>(v * c);
                let chunk = chunk_rows(v, std::mem::size_of::<T>(), CHUNK_BYTES);
                let mut z = Scratch::<T>::new(chunk.min(sel.rows.len()) * v);
                let inputs = (saved.xs.cpu::<T>(n)?, head.cpu::<T>(n)?, sel.targets);
                let lse = (saved.lse.cpu::<T>(n)?, coef);
                lm_head_backward_head(sel.dims, chunk, inputs, lse, z.buf(), &mut dw);
                Some(Tensor::from_cpu(dw, [v, c]))
            } else {
                None
            };
            Ok((dx, dw))
        })
    }
}
