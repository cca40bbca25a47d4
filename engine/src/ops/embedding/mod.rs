//! Embedding lookup; its backward is a scatter-add into the table's gradient.

use super::{Op, float_dispatch, via_f32, wbuf, wgpu_of};
use crate::Device;
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Tensor};
use bft_kernels::cpu::embedding::{gather, scatter_add};

impl Tensor {
    /// Rows of the table `self (V, C)` at `ids` (U32, any shape): output `ids.shape + [C]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Embedding, crate::profile::Phase::Forward);
        if let Some(out) = via_f32(&[self], |t| t[0].embedding(ids))? {
            return Ok(out);
        }
        if self.rank() != 2 {
            return Err(Error::shape(
                "embedding",
                format!("the table must be (vocab, dim), got {}", self.shape()),
            ));
        }
        if ids.dtype() != DType::U32 {
            return Err(Error::DType {
                op: "embedding",
                got: ids.dtype(),
                expected: "u32 ids",
            });
        }
        let (vocab, dim) = (self.dims()[0], self.dims()[1]);
        // Ids are few: a device copy is read back to check them (and to group them for the
        // backward scatter).
        let host_ids = ids.to_device(&Device::Cpu)?;
        let idv = host_ids.cpu::<u32>("embedding")?;
        if let Some(&bad) = idv.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Index {
                op: "embedding",
                index: bad as usize,
                size: vocab,
            });
        }
        let mut dims = ids.dims().to_vec();
        dims.push(dim);
        let out = if let Some((g, i)) = wgpu_of(self) {
            let o = bft_kernels::wgpu::ops::gather(&g, wbuf("embedding", self)?, dim, idv)?;
            Tensor::from_wgpu(o, DType::F32, i, dims)
        } else {
            float_dispatch!("embedding", self.dtype(), |T| {
                let mut o = vec![T::default(); idv.len() * dim];
                gather(self.cpu::<T>("embedding")?, dim, idv, &mut o);
                Ok(Tensor::from_cpu(o, dims))
            })?
        };
        Tape::record(Op::Embedding, &[self, ids], out, || EmbeddingBackward {
            ids: host_ids.stop_gradient(),
            vocab,
        })
    }
}

struct EmbeddingBackward {
    ids: Tensor,
    vocab: usize,
}

impl Backward for EmbeddingBackward {
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if !needs[0] {
            return Ok(vec![None, None]);
        }
        let dim = g.shape().last();
        if let Some((gpu, i)) = wgpu_of(g) {
            let ids = self.ids.cpu::<u32>("embedding")?;
            let dt = bft_kernels::wgpu::ops::scatter_add(
                &gpu,
                wbuf("embedding", g)?,
                dim,
                ids,
                self.vocab,
            )?;
            return Ok(vec![
                Some(Tensor::from_wgpu(dt, DType::F32, i, [self.vocab, dim])),
                None,
            ]);
        }
        let dt = float_dispatch!("embedding backward", g.dtype(), |T| {
            let mut dt = vec![T::default(); self.vocab * dim];
            scatter_add(
                g.cpu::<T>("embedding")?,
                dim,
                self.ids.cpu::<u32>("embedding")?,
                &mut dt,
            );
            Ok(Tensor::from_cpu(dt, [self.vocab, dim]))
        })?;
        Ok(vec![Some(dt), None])
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Device, Error, Op, Tensor};
    use proptest::prelude::*;

    pub(crate) fn cases() -> Vec<Case> {
        // Repeated ids are likely with small vocabularies, exercising the accumulation.
        let strategy = (size(), size(), 1usize..12)
            .prop_flat_map(|(v, c, n)| {
                (
                    tensor(vec![v, c]),
                    proptest::collection::vec(0..v as u32, n),
                )
                    .prop_map(move |(t, ids)| {
                        let ids = Tensor::from_vec(ids, [n], &Device::Cpu).unwrap();
                        instance(vec![t], move |x| x[0].embedding(&ids))
                    })
            })
            .boxed();
        vec![Case::new("embedding", &[Op::Embedding], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }

    #[test]
    fn out_of_range_id_is_an_error_naming_it() {
        let t = Tensor::zeros([4, 2], crate::DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![1u32, 9], [2], &Device::Cpu).unwrap();
        assert!(matches!(
            t.embedding(&ids),
            Err(Error::Index {
                index: 9,
                size: 4,
                ..
            })
        ));
    }
}
