//! Accounting of tensor storage bytes, so benchmarks and tests can report the engine's live and
//! peak memory exactly (independent of the allocator and of other processes).

use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes of tensor storage alive now.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Highest `live_bytes` since the start or the last `reset_peak`.
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the current live bytes.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// A kernel's working buffer that is not a tensor (a chunk of logits, say), counted like tensor
/// storage so that peak-memory figures include it.
pub(crate) struct Scratch<T> {
    pub(crate) buf: Vec<T>,
    _ticket: Ticket,
}

impl<T: Default + Clone> Scratch<T> {
    pub(crate) fn new(len: usize) -> Self {
        Scratch {
            buf: vec![T::default(); len],
            _ticket: Ticket::new(len * std::mem::size_of::<T>()),
        }
    }
}

/// Held by every storage buffer; counts its bytes while alive.
#[derive(Debug)]
pub(crate) struct Ticket(usize);

impl Ticket {
    pub(crate) fn new(bytes: usize) -> Self {
        let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(live, Ordering::Relaxed);
        Ticket(bytes)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.0, Ordering::Relaxed);
    }
}
