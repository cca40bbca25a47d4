//! The tape: a runtime value recording, for each differentiable op, one backward entry with
//! the state that op saved.

use crate::{Error, Op, Result, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Computes the gradients of an op's inputs from the gradient of its output, using state the
/// forward pass saved (as untracked tensors, so no tape can reach itself through an entry).
/// `needs[i]` says whether input `i` is tracked; an untracked input's gradient is never
/// computed (a frozen weight costs no backward GEMM).
pub(crate) trait Backward: Send {
    fn backward(&self, grad: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>>;
}

struct Entry {
    op: Op,
    output: TensorId,
    /// One per op input: its id when tracked, `None` for constants.
    inputs: Vec<Option<TensorId>>,
    backward: Box<dyn Backward>,
}

/// A recording of the differentiable ops applied to tracked tensors. Cheap to clone (a handle).
///
/// `backward` drains the recording, so a tape reused step after step holds only the current
/// step's entries: memory stays flat.
#[derive(Clone, Default)]
pub struct Tape {
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Marks `t` as a trainable leaf on this tape: ops on it are recorded, and `backward`
    /// returns its gradient under the same id. Tensors never tracked (frozen weights, data)
    /// get no gradient buffer.
    pub fn track(&self, t: &Tensor) -> Tensor {
        t.with_tape(self.clone())
    }

    /// Number of recorded entries not yet consumed by `backward`.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every recorded entry (e.g. after an evaluation pass that needs no gradients).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // A panic while recording leaves the Vec consistent; recover it rather than poisoning.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reverse-mode pass from a one-element `loss`: returns the gradients of the tracked leaves.
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        let mut grads = Gradients::default();
        self.backward_into(loss, &mut grads)?;
        Ok(grads)
    }

    /// Like `backward`, but adds (`+=`) into existing gradient buffers: gradient accumulation
    /// over micro-batches.
    pub fn backward_into(&self, loss: &Tensor, grads: &mut Gradients) -> Result<()> {
        let entries = std::mem::take(&mut *self.lock());
        if loss.numel() != 1 {
            return Err(Error::Backward(format!(
                "the loss must have one element, got shape {}",
                loss.shape()
            )));
        }
        match loss.tape() {
            Some(t) if Arc::ptr_eq(&t.entries, &self.entries) => {}
            _ => {
                return Err(Error::Backward(
                    "the loss is not tracked on this tape".into(),
                ));
            }
        }
        // Gradients waiting to flow further back; an op output's entry is freed as soon as it
        // has been processed, so peak memory is that of the widest cut through the graph.
        let mut pending: HashMap<TensorId, Tensor> = HashMap::new();
        pending.insert(
            loss.id(),
            Tensor::ones(loss.shape().clone(), loss.dtype(), &loss.device())?,
        );
        for entry in entries.into_iter().rev() {
            let Some(grad) = pending.remove(&entry.output) else {
                continue;
            };
            let needs: Vec<bool> = entry.inputs.iter().map(Option::is_some).collect();
            let profiled = crate::profile::scope(entry.op, crate::profile::Phase::Backward);
            let input_grads = entry
                .backward
                .backward(&grad, &needs)
                .map_err(|e| Error::Backward(format!("{:?}: {e}", entry.op)))?;
            drop(profiled);
            for (id, g) in entry.inputs.iter().zip(input_grads) {
                if let (Some(id), Some(g)) = (id, g) {
                    match pending.get_mut(id) {
                        Some(acc) => acc.accumulate(&g)?,
                        None => {
                            pending.insert(*id, g);
                        }
                    }
                }
            }
        }
        // What is left are leaves: tracked inputs that no recorded op produced.
        for (id, g) in pending {
            match grads.map.get_mut(&id) {
                Some(acc) => acc.accumulate(&g)?,
                None => {
                    grads.map.insert(id, g);
                }
            }
        }
        Ok(())
    }

    /// Records `out = op(inputs)` if any input is tracked; `backward` is built only then.
    pub(crate) fn record<B: Backward + 'static>(
        op: Op,
        inputs: &[&Tensor],
        out: Tensor,
        backward: impl FnOnce() -> B,
    ) -> Result<Tensor> {
        let Some(tape) = Tape::common(inputs)? else {
            return Ok(out);
        };
        let out = out.with_tape(tape.clone());
        let entry = Entry {
            op,
            output: out.id(),
            inputs: inputs
                .iter()
                .map(|t| t.is_tracked().then(|| t.id()))
                .collect(),
            backward: Box::new(backward()),
        };
        tape.lock().push(entry);
        Ok(out)
    }

    /// For ops with no backward (argmax): a hard error if any input is tracked, because a
    /// silently-zero gradient would train the wrong thing.
    pub(crate) fn record_nondifferentiable(
        op: Op,
        inputs: &[&Tensor],
        out: Tensor,
    ) -> Result<Tensor> {
        match Tape::common(inputs)? {
            Some(_) => Err(Error::NoBackward(op)),
            None => Ok(out),
        }
    }

    /// The one tape the tracked inputs share, if any.
    fn common(inputs: &[&Tensor]) -> Result<Option<Tape>> {
        let mut found: Option<&Tape> = None;
        for t in inputs.iter().filter_map(|t| t.tape()) {
            match found {
                Some(f) if !Arc::ptr_eq(&f.entries, &t.entries) => return Err(Error::TapeMismatch),
                _ => found = Some(t),
            }
        }
        Ok(found.cloned())
    }
}

/// Gradients of tracked leaves, by tensor id.
#[derive(Default, Debug)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// The gradient of `leaf` (same shape and dtype), if it was tracked and reached.
    pub fn get(&self, leaf: &Tensor) -> Option<&Tensor> {
        self.map.get(&leaf.id())
    }
    pub fn remove(&mut self, leaf: &Tensor) -> Option<Tensor> {
        self.map.remove(&leaf.id())
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Drops all buffers (the optimizer's zero-grad).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Error, Tape, Tensor};

    fn setup() -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        (
            Tensor::from_vec(vec![1.0f64, 2.0, 3.0], [3], &dev).unwrap(),
            Tensor::from_vec(vec![0.5f64, -1.0, 4.0], [3], &dev).unwrap(),
        )
    }

    #[test]
    fn gradients_accumulate_across_backward_calls() {
        let (a, b) = setup();
        let tape = Tape::new();
        let mut grads = super::Gradients::default();
        for _ in 0..2 {
            let at = tape.track(&a);
            let loss = at.mul(&b).unwrap().sum_all().unwrap();
            tape.backward_into(&loss, &mut grads).unwrap();
        }
        // d/da sum(a * b) = b, accumulated twice; b is a constant and gets nothing.
        assert_eq!(
            grads.get(&a).unwrap().to_vec::<f64>().unwrap(),
            vec![1.0, -2.0, 8.0]
        );
        assert!(grads.get(&b).is_none());
    }

    #[test]
    fn a_tensor_used_twice_sums_both_paths() {
        let (a, _) = setup();
        let tape = Tape::new();
        let at = tape.track(&a);
        // d/da sum(a * a + 3a) = 2a + 3
        let loss = at
            .mul(&at)
            .unwrap()
            .add(&at.scale(3.0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = tape.backward(&loss).unwrap();
        assert_eq!(
            g.get(&at).unwrap().to_vec::<f64>().unwrap(),
            vec![5.0, 7.0, 9.0]
        );
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let (a, b) = setup();
        let (t1, t2) = (Tape::new(), Tape::new());
        assert!(matches!(
            t1.track(&a).add(&t2.track(&b)),
            Err(Error::TapeMismatch)
        ));
        let v = t1.track(&a).scale(2.0).unwrap();
        assert!(
            t1.backward(&v)
                .unwrap_err()
                .to_string()
                .contains("one element")
        );
        let s = t1.track(&a).sum_all().unwrap();
        assert!(t2.backward(&s).is_err());
        let untracked = Tensor::ones([1], DType::F64, &Device::Cpu).unwrap();
        assert!(t1.backward(&untracked).is_err());
    }
}
