//! Embedding lookup; its backward is a scatter-add into the table's gradient.

mod cpu;
mod cuda;
mod wgpu;

use super::{Op, in_compute_dtype};
use crate::Device;
use crate::backend::kernels;
use crate::tape::{Backward, Tape};
use crate::{DType, Error, Result, Tensor};

/// The embedding kernels of a backend; ids are host values, already checked in range.
pub(crate) trait EmbeddingKernel {
    /// Whether rows of a `dtype` table are gathered as stored; otherwise the table computes
    /// in the backend's compute type.
    fn gathers(&self, dtype: DType) -> bool;
    /// The rows of `table (V, C)` at `ids`, shaped `dims` (`ids`' shape + `[C]`).
    fn embedding(&self, table: &Tensor, ids: &[u32], dims: Vec<usize>) -> Result<Tensor>;
    /// The table's gradient `(vocab, C)` from the output gradient `dy (rows, C)`, summed in
    /// at least f32 and returned in `dy`'s type.
    fn embedding_backward(&self, dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor>;
}

impl Tensor {
    /// Rows of the table `self (V, C)` at `ids` (U32, any shape): output `ids.shape + [C]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Embedding, crate::profile::Phase::Forward);
        // Gathering is a copy, so a backend that can gathers a 16-bit table's rows as stored
        // (the table is never widened whole); the others widen it.
        if !kernels(self.device()).gathers(self.dtype())
            && let Some(out) = in_compute_dtype(&[self], |t| t[0].embedding(ids))?
        {
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
        let out = kernels(self.device()).embedding(self, idv, dims)?;
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
        let ids = self.ids.cpu::<u32>("embedding")?;
        let dt = kernels(g.device()).embedding_backward(g, ids, self.vocab)?;
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

    /// A bf16 table's rows come out as stored (bf16, bit for bit), and a tracked bf16 table
    /// gets the f32 scatter-add rounded once to bf16.
    #[test]
    fn a_bf16_table_is_gathered_as_stored() {
        use crate::{DType, Tape};
        let dev = Device::Cpu;
        let t = Tensor::randn([11, 6], 1.0, 3, DType::BF16, &dev).unwrap();
        let ids = Tensor::from_vec(vec![4u32, 0, 4, 10], [2, 2], &dev).unwrap();
        let got = t.embedding(&ids).unwrap();
        assert_eq!((got.dtype(), got.dims()), (DType::BF16, &[2, 2, 6][..]));
        let want = t.to_dtype(DType::F32).unwrap().embedding(&ids).unwrap();
        assert_eq!(got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
        let tape = Tape::new();
        let tt = tape.track(&t);
        let w = Tensor::randn([2, 2, 6], 1.0, 4, DType::F32, &dev).unwrap();
        let loss = tt
            .embedding(&ids)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = tape.backward(&loss).unwrap().remove(&tt).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        let (g, w) = (g.to_f64_vec().unwrap(), w.to_f64_vec().unwrap());
        // The cast's backward hands each token's gradient over in bf16. Row 4 is hit twice
        // (tokens 0 and 2), rows 0 and 10 once, the rest never.
        let r = |x: f64| half::bf16::from_f64(x).to_f64();
        for c in 0..6 {
            assert_eq!(g[4 * 6 + c], r(r(w[c]) + r(w[12 + c])));
            assert_eq!(g[c], r(w[6 + c]));
            assert_eq!(g[6 + c], 0.0);
        }
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
