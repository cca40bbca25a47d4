//! Where a step's time goes: calls, wall time and bytes allocated per op kind, forward and
//! backward, while profiling is on for the calling thread (`start` .. `finish`; `bft train
//! --profile`).
//!
//! Only the outermost op of a call stack counts: an op built from other ops (`mean` is `sum`
//! then `scale`), or a backward that calls ops, is one entry whose time includes them. So the
//! rows add up to the time spent in ops; the rest of a step is the tape, the optimizer and the
//! data. Bytes are those of the new tensors made inside the op (views share storage and do not
//! count). Time inside the CPU GEMM kernel is counted apart, wherever it is called from (matmul,
//! the fused LM-head loss), so a step's GEMM share is known. The state is per thread (ops run on
//! the thread that calls them; kernels parallelise inside), so concurrent callers, such as
//! tests, do not mix; with profiling off each op reads one thread-local cell.

use crate::Op;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Instant;

/// The half of an op a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Forward,
    Backward,
}

/// Totals of one (op, phase).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpStats {
    pub calls: u64,
    pub seconds: f64,
    /// Bytes of the new tensors the calls made.
    pub bytes: u64,
}

/// What `finish` returns: one row per (op, phase) that ran, slowest first.
#[derive(Clone, Debug)]
pub struct Profile {
    pub rows: Vec<(Op, Phase, OpStats)>,
    /// Time inside the CPU GEMM kernel.
    pub gemm_seconds: f64,
    /// Floating-point operations of those GEMMs (2·m·n·k each).
    pub gemm_flops: f64,
    /// Wall time from `start` to `finish`.
    pub wall_seconds: f64,
}

impl Profile {
    /// Time inside ops (the sum of the rows).
    pub fn op_seconds(&self) -> f64 {
        self.rows.iter().map(|r| r.2.seconds).sum()
    }
}

struct State {
    t0: Instant,
    table: HashMap<(Op, Phase), OpStats>,
    /// Op scopes open.
    depth: usize,
    /// Bytes made inside the outermost open scope.
    bytes: u64,
}

thread_local! {
    /// `Some` while this thread is profiled.
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    /// The innermost op running on this thread, profiled or not: an out-of-memory error names
    /// it (`Error::from`).
    static CURRENT: Cell<Option<(Op, Phase)>> = const { Cell::new(None) };
}

/// The innermost op running on the calling thread, and which half of it.
pub(crate) fn current() -> Option<(Op, Phase)> {
    CURRENT.with(Cell::get)
}

/// Starts profiling the calling thread (dropping any unfinished profile).
pub fn start() {
    STATE.with(|s| {
        *s.borrow_mut() = Some(State {
            t0: Instant::now(),
            table: HashMap::new(),
            depth: 0,
            bytes: 0,
        })
    });
    bft_kernels::cpu::matmul::gemm_counters(true);
}

/// Ends the calling thread's profile; `None` if `start` was not called.
pub fn finish() -> Option<Profile> {
    let (gemm_seconds, gemm_flops) = bft_kernels::cpu::matmul::gemm_counters(false);
    let s = STATE.with(|s| s.borrow_mut().take())?;
    let mut rows: Vec<(Op, Phase, OpStats)> = s
        .table
        .into_iter()
        .map(|((op, ph), st)| (op, ph, st))
        .collect();
    rows.sort_by(|a, b| b.2.seconds.total_cmp(&a.2.seconds));
    Some(Profile {
        rows,
        gemm_seconds,
        gemm_flops,
        wall_seconds: s.t0.elapsed().as_secs_f64(),
    })
}

/// An open op scope: it marks the op as the thread's current one, and while profiling,
/// closing the outermost scope adds its time and bytes to the profile.
pub(crate) struct Scope {
    op: Op,
    phase: Phase,
    /// The op that was current before this one.
    outer_op: Option<(Op, Phase)>,
    /// Whether the thread is profiled (then the scope counts in `depth`).
    profiled: bool,
    /// Set on the outermost profiled scope only.
    t0: Option<Instant>,
}

/// Opens a scope for `op`; with profiling off that is two thread-local cells.
pub(crate) fn scope(op: Op, phase: Phase) -> Scope {
    let outer_op = CURRENT.with(|c| c.replace(Some((op, phase))));
    let outer = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut()?;
        s.depth += 1;
        if s.depth == 1 {
            s.bytes = 0;
        }
        Some(s.depth == 1)
    });
    Scope {
        op,
        phase,
        outer_op,
        profiled: outer.is_some(),
        t0: outer.unwrap_or(false).then(Instant::now),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.outer_op));
        if !self.profiled {
            return;
        }
        let elapsed = self.t0.map(|t| t.elapsed().as_secs_f64());
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(s) = s.as_mut() else {
                return;
            };
            s.depth = s.depth.saturating_sub(1);
            if let Some(seconds) = elapsed {
                let bytes = std::mem::take(&mut s.bytes);
                let row = s.table.entry((self.op, self.phase)).or_default();
                row.calls += 1;
                row.seconds += seconds;
                row.bytes += bytes;
            }
        });
    }
}

/// Counts a new tensor storage of `bytes` as made inside the open scope (if any).
pub(crate) fn made(bytes: usize) {
    STATE.with(|s| {
        if let Some(s) = s.borrow_mut().as_mut().filter(|s| s.depth > 0) {
            s.bytes += bytes as u64;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device, Tape, Tensor};

    /// A small graph, forward and backward: the rows count each outermost op once, GEMM flops
    /// are exact, the matmul's bytes are its output's, and nothing runs while profiling is off.
    #[test]
    fn rows_count_outermost_ops_and_gemm_flops_exactly() {
        let (m, k, n) = (8, 16, 4);
        let x = Tensor::randn([m, k], 1.0, 1, DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::randn([k, n], 1.0, 2, DType::F32, &Device::Cpu).unwrap();
        let tape = Tape::new();
        let w = tape.track(&w);
        start();
        let y = x.matmul(&w).unwrap();
        // mean = sum then scale: two outermost ops, no row of its own.
        let loss = y.silu().unwrap().mean(-1).unwrap().sum_all().unwrap();
        let grads = tape.backward(&loss).unwrap();
        let p = finish().unwrap();
        assert!(grads.get(&w).is_some());
        let row = |op: Op, ph: Phase| {
            p.rows
                .iter()
                .find(|r| r.0 == op && r.1 == ph)
                .map(|r| r.2)
                .unwrap_or_else(|| panic!("no {op:?} {ph:?} row in {:?}", p.rows))
        };
        let mm = row(Op::MatMul, Phase::Forward);
        assert_eq!((mm.calls, mm.bytes), (1, (m * n * 4) as u64));
        assert_eq!(row(Op::Silu, Phase::Forward).calls, 1);
        assert_eq!(row(Op::Sum, Phase::Forward).calls, 2);
        assert_eq!(row(Op::Scale, Phase::Forward).calls, 1);
        assert_eq!(row(Op::MatMul, Phase::Backward).calls, 1);
        // Forward x·w, and only dW = xᵀ·g in the backward (x is a constant).
        assert_eq!(p.gemm_flops, (2 * 2 * m * n * k) as f64);
        assert!(p.gemm_seconds <= p.op_seconds() && p.op_seconds() <= p.wall_seconds);
        assert!(finish().is_none(), "one profile, one finish");
        let _ = x.matmul(&w).unwrap();
        assert!(finish().is_none());
    }
}
