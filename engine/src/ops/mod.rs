//! Every op: one folder each, holding its API, its backward next to its forward, and its tests.
//! Adding an op means adding its folder and one `Op` variant.

mod attention;
mod binary;
mod cast;
mod checkpoint;
mod embedding;
mod layernorm;
mod lm_head;
mod matmul;
mod nll;
mod reduce;
mod rmsnorm;
mod rope;
mod shape;
mod softmax;
mod swiglu;
mod unary;
mod weights;

#[cfg(test)]
pub(crate) mod testing;

/// Every op's kernel trait: the parts of `backend::Kernels`.
pub(crate) mod kernels {
    pub(crate) use super::attention::AttentionKernel;
    pub(crate) use super::binary::BinaryKernel;
    pub(crate) use super::cast::CastKernel;
    pub(crate) use super::embedding::EmbeddingKernel;
    pub(crate) use super::layernorm::LayerNormKernel;
    pub(crate) use super::lm_head::LmHeadKernel;
    pub(crate) use super::matmul::MatMulKernel;
    pub(crate) use super::nll::NllKernel;
    pub(crate) use super::reduce::ReduceKernel;
    pub(crate) use super::rmsnorm::RmsNormKernel;
    pub(crate) use super::rope::RopeKernel;
    pub(crate) use super::shape::LayoutKernel;
    pub(crate) use super::softmax::SoftmaxKernel;
    pub(crate) use super::swiglu::SwiGluKernel;
    pub(crate) use super::unary::UnaryKernel;
    pub(crate) use super::weights::WeighKernel;
}

pub use checkpoint::CheckpointFn;
pub use lm_head::HeadLoss;
pub use rope::{rope_tables, rope_tables_from};
pub use weights::{Weighing, Weights, weakest_window};

use crate::{DType, Error, Result, Tensor};

/// The recorded ops. `Op::ALL` lists them so tests can prove every one has a backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    MatMul,
    Add,
    Sub,
    Mul,
    Div,
    Scale,
    Exp,
    Log,
    Sigmoid,
    Silu,
    Neg,
    Gelu,
    Reshape,
    Permute,
    Narrow,
    Cat,
    Embedding,
    Sum,
    Max,
    RmsNorm,
    LayerNorm,
    Rope,
    Softmax,
    LogSoftmax,
    Attention,
    SwiGlu,
    Nll,
    /// Fused LM head + weighted NLL over selected rows (the loss kernel).
    LmHeadNll,
    /// A recomputed sub-graph (activation checkpointing).
    Checkpoint,
    Cast,
    /// Not differentiable: recording it on a tape is an error.
    ArgMax,
}

impl Op {
    pub const ALL: &'static [Op] = &[
        Op::MatMul,
        Op::Add,
        Op::Sub,
        Op::Mul,
        Op::Div,
        Op::Scale,
        Op::Exp,
        Op::Log,
        Op::Sigmoid,
        Op::Silu,
        Op::Neg,
        Op::Gelu,
        Op::Reshape,
        Op::Permute,
        Op::Narrow,
        Op::Cat,
        Op::Embedding,
        Op::Sum,
        Op::Max,
        Op::RmsNorm,
        Op::LayerNorm,
        Op::Rope,
        Op::Softmax,
        Op::LogSoftmax,
        Op::Attention,
        Op::SwiGlu,
        Op::Nll,
        Op::LmHeadNll,
        Op::Checkpoint,
        Op::Cast,
        Op::ArgMax,
    ];

    pub fn is_differentiable(self) -> bool {
        self != Op::ArgMax
    }
}

/// Runs a CPU kernel body with `$T` bound to the tensor's float type (f32 or f64).
macro_rules! float_dispatch {
    ($op:expr, $dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            got => Err($crate::Error::DType {
                op: $op,
                got,
                expected: "f32 or f64",
            }),
        }
    };
}
pub(crate) use float_dispatch;

/// Checks that two operands share dtype and device.
pub(crate) fn same_kind(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            lhs: a.dtype(),
            rhs: b.dtype(),
        });
    }
    same_device(op, a, b)
}

/// Checks that two operands live on one device (their types may differ: autocast).
pub(crate) fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch {
            op,
            lhs: a.device(),
            rhs: b.device(),
        });
    }
    Ok(())
}

/// The type of an op's result from its float inputs, promoted as PyTorch promotes: the widest
/// among them (f64, then f32, then the 16-bit types), and f32 for two different 16-bit types.
/// So all-bf16 inputs give bf16, and an f32 activation with a bf16 weight gives f32 (autocast).
pub(crate) fn promoted(inputs: &[&Tensor]) -> DType {
    let floats = || inputs.iter().map(|t| t.dtype()).filter(|d| d.is_float());
    if floats().any(|d| d == DType::F64) {
        return DType::F64;
    }
    let mut halves = floats().filter(|d| d.is_half());
    match (floats().any(|d| d == DType::F32), halves.next()) {
        (false, Some(h)) if halves.all(|d| d == h) => h,
        _ => DType::F32,
    }
}

/// Runs `f` in the type the inputs' backend computes the op's result type in
/// (`Backend::compute_dtype`; DESIGN.md §2): an input of another float type, where one of the
/// two is 16-bit, is cast to it first, and the result is cast back to the promoted type
/// (16-bit only when every float input is). `None` when no input needs a cast: the caller runs
/// its kernel on the inputs as they are. The casts are recorded ops, so gradients flow through.
pub(crate) fn in_compute_dtype(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let Some(first) = inputs.first() else {
        return Ok(None);
    };
    let to = promoted(inputs);
    let compute = crate::backend::kernels(first.device()).compute_dtype(to);
    let cast = |d: DType| d.is_float() && d != compute && (d.is_half() || compute.is_half());
    if !inputs.iter().any(|t| cast(t.dtype())) {
        return Ok(None);
    }
    let inputs = inputs
        .iter()
        .map(|t| {
            if cast(t.dtype()) {
                t.to_dtype(compute)
            } else {
                Ok((*t).clone())
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let out = f(&inputs)?;
    if out.dtype() == to {
        return Ok(Some(out));
    }
    out.to_dtype(to).map(Some)
}

/// Resolves a possibly negative axis against `rank`.
pub(crate) fn axis(op: &'static str, dim: isize, rank: usize) -> Result<usize> {
    let d = if dim < 0 { dim + rank as isize } else { dim };
    if d < 0 || d as usize >= rank {
        return Err(Error::shape(
            op,
            format!("axis {dim} is out of range for rank {rank}"),
        ));
    }
    Ok(d as usize)
}

#[cfg(test)]
mod registry_tests {
    use super::testing::Case;
    use super::*;
    use crate::Tape;
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    /// Every op folder's gradient-check cases; one line per folder.
    fn all_cases() -> Vec<Case> {
        [
            attention::cases(),
            binary::cases(),
            cast::cases(),
            checkpoint::cases(),
            embedding::cases(),
            layernorm::cases(),
            lm_head::cases(),
            matmul::cases(),
            nll::cases(),
            reduce::cases(),
            rmsnorm::cases(),
            rope::cases(),
            shape::cases(),
            softmax::cases(),
            swiglu::cases(),
            unary::cases(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Walks `Op::ALL`: each differentiable op is covered by a gradient-check case, and one
    /// instance of that case, tracked on a tape, yields a gradient for every input. The one op
    /// without a backward refuses to be recorded.
    #[test]
    fn every_op_has_a_backward_and_a_gradient_check() {
        let cases = all_cases();
        let mut runner = TestRunner::deterministic();
        for &op in Op::ALL {
            if !op.is_differentiable() {
                let x = Tensor::ones([2, 3], DType::F32, &crate::Device::Cpu).unwrap();
                let err = Tape::new().track(&x).argmax().unwrap_err();
                assert!(
                    matches!(err, Error::NoBackward(o) if o == op),
                    "{op:?}: {err}"
                );
                continue;
            }
            let case = cases
                .iter()
                .find(|c| c.covers.contains(&op))
                .unwrap_or_else(|| panic!("{op:?} has no gradient check"));
            let inst = case.strategy.new_tree(&mut runner).unwrap().current();
            let tape = Tape::new();
            let xs: Vec<Tensor> = inst.inputs.iter().map(|t| tape.track(t)).collect();
            let loss = (inst.f)(&xs).unwrap().sum_all().unwrap();
            let grads = tape.backward(&loss).unwrap();
            for x in &xs {
                let g = grads
                    .get(x)
                    .unwrap_or_else(|| panic!("{op:?} ({}) gave no gradient", case.name));
                assert_eq!(g.shape(), x.shape());
            }
            assert!(tape.is_empty(), "backward must drain the tape");
        }
    }

    #[test]
    fn stop_gradient_blocks_the_gradient() {
        let dev = crate::Device::Cpu;
        let tape = Tape::new();
        let x = tape.track(&Tensor::from_vec(vec![2.0f64, 3.0], [2], &dev).unwrap());
        // d/dx sum(x * sg(x)) = sg(x) = [2, 3]; without stop_gradient it would be 2x.
        let loss = x.mul(&x.stop_gradient()).unwrap().sum_all().unwrap();
        let g = tape.backward(&loss).unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec::<f64>().unwrap(), vec![2.0, 3.0]);
    }
}
