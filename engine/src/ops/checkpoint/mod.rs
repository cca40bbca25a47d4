//! Activation checkpointing: run a sub-graph without recording it, and recompute it in the
//! backward pass. Only the sub-graph's inputs stay alive between the passes.

use super::Op;
use crate::tape::{Backward, Tape};
use crate::{Error, Result, Tensor};
use std::sync::Arc;

/// A recomputable piece of the graph: a pure function of its tensor inputs.
pub type CheckpointFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

impl Tensor {
    /// `f(inputs)`, recorded as one tape entry that saves only `inputs`: the activations inside
    /// `f` are freed after the forward pass and recomputed (on a local tape) when the gradient
    /// is needed. `f` must be deterministic for the gradients to match the plain computation.
    pub fn checkpoint(inputs: &[Tensor], f: CheckpointFn) -> Result<Tensor> {
        let _profiled = crate::profile::scope(Op::Checkpoint, crate::profile::Phase::Forward);
        let plain: Vec<Tensor> = inputs.iter().map(Tensor::stop_gradient).collect();
        let out = f(&plain)?;
        if out.is_tracked() {
            return Err(Error::Backward(
                "a checkpointed function must depend only on its inputs".into(),
            ));
        }
        let refs: Vec<&Tensor> = inputs.iter().collect();
        Tape::record(Op::Checkpoint, &refs, out, || CheckpointBackward {
            inputs: plain,
            f,
        })
    }
}

struct CheckpointBackward {
    inputs: Vec<Tensor>,
    f: CheckpointFn,
}

impl Backward for CheckpointBackward {
    /// Recompute `y = f(x)` with the needed inputs tracked, then backpropagate `sum(y * g)`,
    /// whose gradient is exactly the vector-Jacobian product `g^T dy/dx`.
    fn backward(&self, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let tape = Tape::new();
        let xs: Vec<Tensor> = self
            .inputs
            .iter()
            .zip(needs)
            .map(|(x, &n)| if n { tape.track(x) } else { x.clone() })
            .collect();
        let y = (self.f)(&xs)?;
        let grads = tape.backward(&y.mul(g)?.sum_all()?)?;
        Ok(xs
            .iter()
            .zip(needs)
            .map(|(x, &n)| if n { grads.get(x).cloned() } else { None })
            .collect())
    }
}

#[cfg(test)]
pub(crate) use tests::cases;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::{Op, Tensor};
    use proptest::prelude::*;
    use std::sync::Arc;

    pub(crate) fn cases() -> Vec<Case> {
        let strategy = (size(), size())
            .prop_flat_map(|(a, b)| {
                (tensor(vec![a, b]), tensor(vec![b])).prop_map(|(x, w)| {
                    instance(vec![x, w], |t| {
                        let f: super::CheckpointFn =
                            Arc::new(|v| v[0].silu()?.mul(&v[1])?.softmax());
                        Tensor::checkpoint(t, f)
                    })
                })
            })
            .boxed();
        vec![Case::new("checkpoint", &[Op::Checkpoint], strategy)]
    }

    #[test]
    fn gradcheck() {
        cases().iter().for_each(|c| gradcheck_case(c, 24));
    }
}
