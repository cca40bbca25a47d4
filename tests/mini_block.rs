//! A whole decoder block (attention + MLP + norms + residuals) composed from engine ops, checked
//! by finite differences in f64 with respect to its input and every weight.

use bft_engine::gradcheck::{Tolerance, check};
use bft_engine::ops::rope_tables;
use bft_engine::{DType, Device, Tensor};
use bft_model::Block;
use bft_tests::tiny_block_config;

#[test]
fn decoder_block_gradients_match_finite_differences() {
    for qkv_bias in [false, true] {
        let cfg = tiny_block_config(qkv_bias);
        let block = Block::random(cfg.clone(), 7, DType::F64).unwrap();
        let x = Tensor::randn([2, 3, cfg.hidden], 1.0, 11, DType::F64, &Device::Cpu).unwrap();
        let (cos, sin) = rope_tables(10_000.0, cfg.head_dim, 3, 0, DType::F64).unwrap();
        let mut inputs = vec![x];
        inputs.extend(block.tensors().iter().cloned());
        let f = |xs: &[Tensor]| -> bft_engine::Result<Tensor> {
            let b = Block::from_tensors(cfg.clone(), xs[1..].to_vec()).expect("shapes are fixed");
            Ok(b.forward(&xs[0], &cos, &sin).expect("forward"))
        };
        check(&f, &inputs, Tolerance::default())
            .unwrap_or_else(|e| panic!("qkv_bias={qkv_bias}: {e}"));
    }
}

#[test]
fn block_rejects_wrong_weight_shapes_by_name() {
    let cfg = tiny_block_config(false);
    let mut ts: Vec<Tensor> = Block::random(cfg.clone(), 1, DType::F32)
        .unwrap()
        .tensors()
        .to_vec();
    ts[2] = Tensor::zeros([3, 6], DType::F32, &Device::Cpu).unwrap();
    let err = Block::from_tensors(cfg, ts).unwrap_err().to_string();
    assert!(
        err.contains("self_attn.k_proj.weight") && err.contains("[4, 6]"),
        "{err}"
    );
}
