//! Helpers shared by the workspace-level integration tests.

use bft_model::BlockConfig;

/// A small layer with GQA (4 query heads over 2 K/V heads), odd sizes and Qwen2-style bias.
pub fn tiny_block_config(qkv_bias: bool) -> BlockConfig {
    BlockConfig {
        hidden: 6,
        heads: 4,
        kv_heads: 2,
        head_dim: 2,
        ffn: 5,
        rms_eps: 1e-5,
        qkv_bias,
    }
}
