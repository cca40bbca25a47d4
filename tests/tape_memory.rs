//! A tape reused for 1,000 training steps keeps memory flat: `backward` drains its entries and
//! intermediate buffers are freed. The storage accounting is process-wide, so this file holds a
//! single test (its own process).

use bft_engine::{DType, Device, Gradients, Tape, Tensor, memory};

#[test]
fn tape_reused_for_1000_steps_keeps_memory_flat() {
    let dev = Device::Cpu;
    let mut w1 = Tensor::randn([16, 32], 0.1, 1, DType::F32, &dev).unwrap();
    let w2 = Tensor::randn([32, 8], 0.1, 2, DType::F32, &dev).unwrap(); // frozen
    let x = Tensor::randn([4, 16], 1.0, 3, DType::F32, &dev).unwrap();
    let tape = Tape::new();
    let mut live_after = Vec::new();
    let mut peaks = Vec::new();
    for step in 0..1000 {
        memory::reset_peak();
        let w = tape.track(&w1);
        let loss = x
            .matmul(&w)
            .unwrap()
            .silu()
            .unwrap()
            .matmul(&w2)
            .unwrap()
            .mean(1)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(!tape.is_empty());
        let grads: Gradients = tape.backward(&loss).unwrap();
        assert!(tape.is_empty(), "step {step}: backward must drain the tape");
        assert_eq!(
            grads.len(),
            1,
            "only the tracked leaf gets a gradient buffer"
        );
        assert!(grads.get(&w2).is_none());
        // A plain SGD step, so the weights really change every step.
        let g = grads.get(&w).unwrap().scale(-0.01).unwrap();
        w1 = w1.add(&g).unwrap();
        drop((w, loss, grads, g));
        live_after.push(memory::live_bytes());
        peaks.push(memory::peak_bytes());
    }
    // After a warm-up step, live and peak bytes are identical every step.
    assert!(
        live_after[1..].iter().all(|&b| b == live_after[1]),
        "live bytes drift: {:?}",
        &live_after[..5]
    );
    assert!(
        peaks[1..].iter().all(|&b| b == peaks[1]),
        "peak bytes drift"
    );
    assert_eq!(live_after[999], (16 * 32 + 32 * 8 + 4 * 16) * 4);
}
