//! Shared test machinery: random f64 inputs from proptest and the gradient-check runner every
//! op folder uses.

use crate::gradcheck::{self, Tolerance};
use crate::{Device, Result, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::sync::Arc;

pub(crate) type OpFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// One random instance of an op under test: differentiable inputs plus the function applying
/// the op (non-differentiable arguments such as ids or axes are captured in it).
#[derive(Clone)]
pub(crate) struct Instance {
    pub inputs: Vec<Tensor>,
    pub f: OpFn,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes: Vec<_> = self.inputs.iter().map(|t| t.dims().to_vec()).collect();
        write!(f, "Instance{shapes:?}")
    }
}

/// A named family of instances covering one or more `Op`s.
pub(crate) struct Case {
    pub name: &'static str,
    pub covers: &'static [crate::Op],
    pub strategy: BoxedStrategy<Instance>,
    pub tol: Tolerance,
}

impl Case {
    pub(crate) fn new(
        name: &'static str,
        covers: &'static [crate::Op],
        strategy: BoxedStrategy<Instance>,
    ) -> Case {
        Case {
            name,
            covers,
            strategy,
            tol: Tolerance::default(),
        }
    }
}

/// A f64 tensor of the given shape with values in [-2, 2].
pub(crate) fn tensor(dims: Vec<usize>) -> BoxedStrategy<Tensor> {
    let n = dims.iter().product::<usize>();
    proptest::collection::vec(-2.0f64..2.0, n)
        .prop_map(move |v| Tensor::from_vec(v, dims.clone(), &Device::Cpu).unwrap())
        .boxed()
}

/// Positive values in [0.5, 2.5] (for log and division).
pub(crate) fn positive(dims: Vec<usize>) -> BoxedStrategy<Tensor> {
    let n = dims.iter().product::<usize>();
    proptest::collection::vec(0.5f64..2.5, n)
        .prop_map(move |v| Tensor::from_vec(v, dims.clone(), &Device::Cpu).unwrap())
        .boxed()
}

/// Sizes that include 1 and odd values (not multiples of any tile or vector width).
pub(crate) fn size() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![Just(1usize), 2usize..6, Just(7usize), Just(9usize)]
}

pub(crate) fn instance(
    inputs: Vec<Tensor>,
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Instance {
    Instance {
        inputs,
        f: Arc::new(f),
    }
}

/// Runs finite-difference gradient checks on `cases` random instances of `case`.
pub(crate) fn gradcheck_case(case: &Case, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case.strategy, |inst| {
        gradcheck::check(&*inst.f, &inst.inputs, case.tol)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", case.name)))
    });
    if let Err(e) = result {
        panic!("gradient check of {} failed: {e}", case.name);
    }
}
