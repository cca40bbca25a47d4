//! A frozen bf16 weight stays 16-bit on the tape: after the forward pass of a LoRA-style layer
//! under autocast (f32 activations, a frozen bf16 weight, f32 adapters), no f32 copy of the
//! weight is alive, and the backward gives the activations and adapters f32 gradients. The storage accounting is process-wide,
//! so this file holds a single test (its own process).

use bft_engine::{DType, Device, Tape, Tensor, memory};

#[test]
fn a_frozen_bf16_weight_is_not_kept_in_f32_for_the_backward() {
    let dev = Device::Cpu;
    let (rows, d_in, d_out, rank) = (64, 512, 2048, 8);
    let w = Tensor::randn([d_out, d_in], 0.05, 1, DType::BF16, &dev).unwrap();
    let x = Tensor::randn([rows, d_in], 1.0, 2, DType::F32, &dev).unwrap();
    let a = Tensor::randn([rank, d_in], 0.05, 3, DType::F32, &dev).unwrap();
    let b = Tensor::randn([d_out, rank], 0.05, 4, DType::F32, &dev).unwrap();
    let tape = Tape::new();
    let (x, a, b) = (tape.track(&x), tape.track(&a), tape.track(&b));
    let before = memory::live_bytes();
    // y = x W^T + (x A^T) B^T: the base path and the adapter path.
    let base = x.matmul_t(&w, false, true).unwrap();
    let lora = x
        .matmul_t(&a, false, true)
        .unwrap()
        .matmul_t(&b, false, true)
        .unwrap();
    let y = base.add(&lora).unwrap();
    let grown = memory::live_bytes() - before;
    let weight_f32 = d_out * d_in * 4;
    // Live: the f32 outputs (3 x 64 x 2048 x 4 bytes: 1.5 MB), the small adapter product; an
    // f32 copy of the weight alone would be 4 MB.
    assert!(
        grown < weight_f32 / 2,
        "{grown} bytes live after the forward pass (an f32 weight copy is {weight_f32})"
    );
    assert_eq!(y.dtype(), DType::F32);
    let loss = y.sum_all().unwrap();
    let grads = tape.backward(&loss).unwrap();
    for (t, want) in [(&a, DType::F32), (&b, DType::F32), (&x, DType::F32)] {
        assert_eq!(grads.get(t).unwrap().dtype(), want);
    }
}
