//! One pre-norm decoder layer as in Llama and Qwen2:
//! `x += o_proj(attn(rope(q), rope(k), v))` on `rms_norm(x)`, then
//! `x += down(swiglu(gate(h), up(h)))` on `rms_norm(x)`.

use crate::{Error, Result};
use bft_engine::{DType, Device, Tensor};

/// Sizes of one layer. `qkv_bias` is Qwen2's q/k/v projection bias.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockConfig {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f64,
    pub qkv_bias: bool,
}

impl BlockConfig {
    /// Names and shapes of the layer's tensors, in `Block::tensors` order (HF's names).
    pub fn tensor_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (c, q, kv, f) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.ffn,
        );
        let mut v = vec![
            ("input_layernorm.weight", vec![c]),
            ("self_attn.q_proj.weight", vec![q, c]),
            ("self_attn.k_proj.weight", vec![kv, c]),
            ("self_attn.v_proj.weight", vec![kv, c]),
            ("self_attn.o_proj.weight", vec![c, q]),
            ("post_attention_layernorm.weight", vec![c]),
            ("mlp.gate_proj.weight", vec![f, c]),
            ("mlp.up_proj.weight", vec![f, c]),
            ("mlp.down_proj.weight", vec![c, f]),
        ];
        if self.qkv_bias {
            v.extend([
                ("self_attn.q_proj.bias", vec![q]),
                ("self_attn.k_proj.bias", vec![kv]),
                ("self_attn.v_proj.bias", vec![kv]),
            ]);
        }
        v
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.heads, self.kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            )));
        }
        Ok(())
    }
}

/// One layer's keys (after RoPE) and values of the positions seen so far, `(B, Hkv, S, D)`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A decoder layer's weights. Linear weights are `(out, in)` as in HF checkpoints.
#[derive(Clone, Debug)]
pub struct Block {
    pub config: BlockConfig,
    tensors: Vec<Tensor>,
}

impl Block {
    /// Wraps tensors given in `BlockConfig::tensor_shapes` order, checking every shape.
    pub fn from_tensors(config: BlockConfig, tensors: Vec<Tensor>) -> Result<Block> {
        config.check()?;
        let shapes = config.tensor_shapes();
        if tensors.len() != shapes.len() {
            return Err(Error::Config(format!(
                "expected {} tensors, got {}",
                shapes.len(),
                tensors.len()
            )));
        }
        for ((name, want), t) in shapes.iter().zip(&tensors) {
            if t.dims() != want.as_slice() {
                return Err(Error::WeightShape {
                    name: name.to_string(),
                    expected: want.clone(),
                    got: t.dims().to_vec(),
                });
            }
        }
        Ok(Block { config, tensors })
    }

    /// Random weights (normal, std 0.2; norms around 1) for tests and benchmarks.
    pub fn random(config: BlockConfig, seed: u64, dtype: DType) -> Result<Block> {
        let dev = Device::Cpu;
        let tensors = config
            .tensor_shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let t = Tensor::randn(
                    shape.clone(),
                    0.2,
                    seed.wrapping_mul(31).wrapping_add(i as u64),
                    dtype,
                    &dev,
                )?;
                if name.ends_with("layernorm.weight") {
                    t.add(&Tensor::ones(shape, dtype, &dev)?)
                } else {
                    Ok(t)
                }
            })
            .collect::<bft_engine::Result<Vec<_>>>()?;
        Block::from_tensors(config, tensors)
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// `x (B, T, C)` -> `(B, T, C)`; `cos, sin (T, head_dim / 2)` from `rope_tables`.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.forward_cached(x, cos, sin, None)
    }

    /// As `forward`, attending also to the positions held in `cache` (which then grows by T);
    /// `cos, sin` must be the tables for positions `cache.len()..cache.len() + T`.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let w = &self.tensors;
        let (b, t) = match x.dims() {
            [b, t, h] if *h == c.hidden => (*b, *t),
            d => {
                return Err(Error::Config(format!(
                    "block input must be (B, T, {}), got {d:?}",
                    c.hidden
                )));
            }
        };
        let h = x.rms_norm(&w[0], c.rms_eps)?;
        // (B, T, C) . (out, C)^T -> (B, T, out) -> (B, T, heads, D) -> (B, heads, T, D)
        let proj = |wi: usize, bias: Option<usize>, heads: usize| -> Result<Tensor> {
            let mut y = h.matmul_t(&w[wi], false, true)?;
            if let Some(bi) = bias {
                y = y.add(&w[bi])?;
            }
            Ok(y.reshape([b, t, heads, c.head_dim])?.transpose(1, 2)?)
        };
        let bias = |i: usize| c.qkv_bias.then_some(9 + i);
        let q = proj(1, bias(0), c.heads)?.rope(cos, sin)?;
        let mut k = proj(2, bias(1), c.kv_heads)?.rope(cos, sin)?;
        let mut v = proj(3, bias(2), c.kv_heads)?;
        if let Some(cache) = cache {
            // (B, Hkv, S, D): earlier positions first; K is cached after RoPE.
            if let (Some(pk), Some(pv)) = (&cache.k, &cache.v) {
                k = Tensor::cat(&[pk.clone(), k], 2)?;
                v = Tensor::cat(&[pv.clone(), v], 2)?;
            }
            cache.k = Some(k.clone());
            cache.v = Some(v.clone());
        }
        // (B, heads, T, D) -> (B, T, heads * D)
        let a = q
            .causal_attention(&k, &v, None)?
            .transpose(1, 2)?
            .reshape([b, t, c.heads * c.head_dim])?;
        let x = x.add(&a.matmul_t(&w[4], false, true)?)?;
        let h = x.rms_norm(&w[5], c.rms_eps)?;
        let m = h
            .matmul_t(&w[6], false, true)?
            .swiglu(&h.matmul_t(&w[7], false, true)?)?;
        Ok(x.add(&m.matmul_t(&w[8], false, true)?)?)
    }
}
