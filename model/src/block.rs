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

    /// One cache of several rows' caches `(1, Hkv, S_b, D)`, each left-padded with `pad[b]`
    /// zero positions to one length: `(B, Hkv, S, D)`. The padding must be masked out of
    /// attention (`Transformer::hidden_cached_padded` with the same `pad`).
    pub fn stack_left_padded<'a>(
        rows: impl Iterator<Item = &'a KvCache>,
        pad: &[usize],
    ) -> Result<KvCache> {
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (row, &p) in rows.zip(pad) {
            let (Some(k), Some(v)) = (&row.k, &row.v) else {
                return Err(Error::Config("stacking an empty KV cache".into()));
            };
            for (t, out) in [(k, &mut ks), (v, &mut vs)] {
                let mut d = t.dims().to_vec();
                out.push(if p == 0 {
                    t.clone()
                } else {
                    d[2] = p;
                    Tensor::cat(&[Tensor::zeros(d, t.dtype(), &t.device())?, t.clone()], 2)?
                });
            }
        }
        if ks.len() != pad.len() {
            return Err(Error::Config(format!(
                "{} caches for {} pads",
                ks.len(),
                pad.len()
            )));
        }
        Ok(KvCache {
            k: Some(Tensor::cat(&ks, 0)?),
            v: Some(Tensor::cat(&vs, 0)?),
        })
    }
}

/// The seven linear projections of a layer, the modules LoRA can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Linear {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Linear {
    pub const ALL: [Linear; 7] = [
        Linear::Q,
        Linear::K,
        Linear::V,
        Linear::O,
        Linear::Gate,
        Linear::Up,
        Linear::Down,
    ];

    /// The HF module name (`q_proj`, ...), as PEFT's `target_modules` lists it.
    pub fn module(self) -> &'static str {
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ][self as usize]
    }

    /// The module path under `model.layers.N.`.
    pub fn path(self) -> String {
        let parent = if self as usize <= 3 {
            "self_attn"
        } else {
            "mlp"
        };
        format!("{parent}.{}", self.module())
    }

    /// Index of this projection's weight in `BlockConfig::tensor_shapes`.
    fn weight_index(self) -> usize {
        [1, 2, 3, 4, 6, 7, 8][self as usize]
    }
}

/// LoRA factors of one projection: `A (r, in)`, `B (out, r)`; the update is `scale * B A`.
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
}

/// A decoder layer's weights. Linear weights are `(out, in)` as in HF checkpoints.
#[derive(Clone, Debug)]
pub struct Block {
    pub config: BlockConfig,
    tensors: Vec<Tensor>,
    /// Optional LoRA adapter per projection, indexed by `Linear`.
    lora: [Option<LoraPair>; 7],
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
        Ok(Block {
            config,
            tensors,
            lora: Default::default(),
        })
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

    /// The base weights, for full-parameter training (replaced in place by the optimizer).
    pub fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }

    pub fn lora(&self, l: Linear) -> Option<&LoraPair> {
        self.lora[l as usize].as_ref()
    }

    /// Every attached adapter, in `Linear::ALL` order.
    pub fn lora_pairs_mut(&mut self) -> impl Iterator<Item = &mut LoraPair> {
        self.lora.iter_mut().flatten()
    }

    /// Attaches (or with `None` removes) the adapter of one projection, checking its shapes.
    pub fn set_lora(&mut self, l: Linear, pair: Option<LoraPair>) -> Result<()> {
        if let Some(p) = &pair {
            let w = self.tensors[l.weight_index()].dims();
            let r = p.a.dims().first().copied().unwrap_or(0);
            if p.a.dims() != [r, w[1]] || p.b.dims() != [w[0], r] {
                return Err(Error::WeightShape {
                    name: format!("LoRA of {} (A, B)", l.path()),
                    expected: vec![r, w[1], w[0], r],
                    got: [p.a.dims(), p.b.dims()].concat(),
                });
            }
        }
        self.lora[l as usize] = pair;
        Ok(())
    }

    /// Folds every adapter into its base weight (`W += scale * B A`) and removes it.
    pub fn merge_lora(&mut self) -> Result<()> {
        for l in Linear::ALL {
            if let Some(p) = self.lora[l as usize].take() {
                let i = l.weight_index();
                let delta =
                    p.b.matmul(&p.a)?
                        .scale(p.scale)?
                        .to_dtype(self.tensors[i].dtype())?;
                self.tensors[i] = self.tensors[i].add(&delta)?;
            }
        }
        Ok(())
    }

    /// `x W^T`, plus `scale * (x A^T) B^T` when the projection has an adapter: the low-rank
    /// path never forms `B A`.
    fn linear(&self, x: &Tensor, l: Linear, dropout_seed: Option<u64>) -> Result<Tensor> {
        let w = &self.tensors[l.weight_index()];
        let Some(p) = &self.lora[l as usize] else {
            return Ok(x.matmul_t(w, false, true)?);
        };
        let xd = match dropout_seed {
            Some(seed) if p.dropout > 0.0 => x.mul(&dropout_mask(
                x,
                p.dropout,
                seed ^ (l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )?)?,
            _ => x.clone(),
        };
        // The scale goes on the rank-sized `x A^T (B, T, r)`, not on the output-sized product:
        // the same math, r/out of the elementwise work and memory, forward and backward. The
        // up-projection lands on the frozen product in the same pass over the output where
        // the backend can (`linear_plus`), or accumulates into its buffer (no separate Add).
        let u = xd.matmul_t(&p.a, false, true)?.scale(p.scale)?;
        Ok(x.linear_plus(w, &u, &p.b)?)
    }

    /// `linear` for projections that read the same input (q, k, v; gate, up). Their adapters'
    /// down-projections are one product `x [A_1; A_2; ..]^T (B, T, r_1 + r_2 + ..)`: the input
    /// is read, and its gradient `dA = du^T x` formed, once for the group instead of once per
    /// projection (rank-16 products are bound by reading `x`, not by their flops). Projections
    /// whose adapters differ in scale or draw dropout masks (each its own) go one by one.
    fn linears<const N: usize>(
        &self,
        x: &Tensor,
        ls: [Linear; N],
        dropout_seed: Option<u64>,
    ) -> Result<[Tensor; N]> {
        let pairs: Vec<&LoraPair> = ls.iter().filter_map(|&l| self.lora(l)).collect();
        let fused = pairs.len() == N
            && N > 1
            && pairs.iter().all(|p| p.scale == pairs[0].scale)
            && (dropout_seed.is_none() || pairs.iter().all(|p| p.dropout == 0.0));
        let ys = if fused {
            let a = Tensor::cat(&pairs.iter().map(|p| p.a.clone()).collect::<Vec<_>>(), 0)?;
            let ranks: Vec<usize> = pairs.iter().map(|p| p.a.dims()[0]).collect();
            // (B, T, C) . (sum r, C)^T -> (B, T, sum r), scaled as in `linear`, then one
            // (B, T, r) piece per projection.
            let u = x
                .matmul_t(&a, false, true)?
                .scale(pairs[0].scale)?
                .split(-1, &ranks)?;
            ls.iter()
                .zip(&pairs)
                .zip(u)
                .map(|((&l, p), u)| Ok(x.linear_plus(&self.tensors[l.weight_index()], &u, &p.b)?))
                .collect::<Result<Vec<_>>>()?
        } else {
            ls.iter()
                .map(|&l| self.linear(x, l, dropout_seed))
                .collect::<Result<Vec<_>>>()?
        };
        // cannot fail: one output per projection.
        Ok(ys.try_into().expect("one output a projection"))
    }

    /// `x (B, T, C)` -> `(B, T, C)`; `cos, sin (T, head_dim / 2)` from `rope_tables`.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, cos, sin, None, None, None)
    }

    /// As `forward`, in training mode: LoRA dropout masks are drawn from `dropout_seed`
    /// (deterministically, so a recomputation under checkpointing sees the same masks).
    pub fn forward_train(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        dropout_seed: u64,
    ) -> Result<Tensor> {
        self.forward_impl(x, cos, sin, None, Some(dropout_seed), None)
    }

    /// Every tensor the layer computes with: base weights, then each adapter's A and B in
    /// `Linear::ALL` order (what a checkpoint of this layer takes as inputs).
    pub fn params(&self) -> Vec<Tensor> {
        let mut v = self.tensors.clone();
        for p in self.lora.iter().flatten() {
            v.push(p.a.clone());
            v.push(p.b.clone());
        }
        v
    }

    /// A copy of this layer computing with `params` (in `params()` order) instead.
    pub fn with_params(&self, params: &[Tensor]) -> Block {
        let mut b = self.clone();
        let n = b.tensors.len();
        b.tensors = params[..n].to_vec();
        for (p, ab) in b.lora.iter_mut().flatten().zip(params[n..].chunks(2)) {
            p.a = ab[0].clone();
            p.b = ab[1].clone();
        }
        b
    }

    /// As `forward`, attending also to the positions held in `cache` (which then grows by T);
    /// `cos, sin` must be the tables for positions `cache.len()..cache.len() + T`.
    ///
    /// With `pad`, row `b`'s first `pad[b]` positions (of the cache and of `x`) are left
    /// padding: no position attends to them (inference only; see `padded_attention`).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
        pad: Option<&[usize]>,
    ) -> Result<Tensor> {
        self.forward_impl(x, cos, sin, cache, None, pad)
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
        dropout_seed: Option<u64>,
        pad: Option<&[usize]>,
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
        let [q, k, v] = self.linears(&h, [Linear::Q, Linear::K, Linear::V], dropout_seed)?;
        // (B, T, out) -> (B, T, heads, D) -> (B, heads, T, D)
        let heads = |y: Tensor, i: usize, heads: usize| -> Result<Tensor> {
            let y = if c.qkv_bias { y.add(&w[9 + i])? } else { y };
            Ok(y.reshape([b, t, heads, c.head_dim])?.transpose(1, 2)?)
        };
        // The projections are fresh tensors: a backend with an in-place kernel rotates them
        // where they are.
        let q = heads(q, 0, c.heads)?.rope_in_place(cos, sin)?;
        let mut k = heads(k, 1, c.kv_heads)?.rope_in_place(cos, sin)?;
        let mut v = heads(v, 2, c.kv_heads)?;
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
        let a = match pad {
            Some(pad) if pad.iter().any(|&p| p > 0) => padded_attention(&q, &k, &v, pad)?,
            // Under autocast (16-bit frozen weights, whose products run bf16 x bf16 -> f32), the
            // attention products run in bf16 too where the backend has them, as in PyTorch.
            _ if w[1].dtype() == DType::BF16 => q.causal_attention_autocast(&k, &v, None)?,
            _ => q.causal_attention(&k, &v, None)?,
        };
        let a = a.transpose(1, 2)?.reshape([b, t, c.heads * c.head_dim])?;
        // The residual add and the second norm: one pass where the backend fuses them.
        let (x, h) =
            x.add_rms_norm(&self.linear(&a, Linear::O, dropout_seed)?, &w[5], c.rms_eps)?;
        let [gate, up] = self.linears(&h, [Linear::Gate, Linear::Up], dropout_seed)?;
        let m = gate.swiglu(&up)?;
        Ok(x.add(&self.linear(&m, Linear::Down, dropout_seed)?)?)
    }
}

/// Causal attention of `q (B, Hq, T, D)` over `k, v (B, Hkv, S, D)` in which row `b`'s first
/// `pad[b]` keys are left padding and get no weight: batched generation of prompts of
/// different lengths. RoPE is relative, so shifting a row's positions by its padding changes
/// nothing else. Composed of matmul, add and softmax with the (B, Hq, T, S) mask materialised,
/// so it is for inference (no fused backward); a padding query attends to itself alone, which
/// keeps its (never used) output finite.
fn padded_attention(q: &Tensor, k: &Tensor, v: &Tensor, pad: &[usize]) -> Result<Tensor> {
    let (&[b, hq, t, d], &[_, hkv, s, _]) = (q.dims(), k.dims()) else {
        return Err(Error::Config(format!(
            "padded attention needs 4-D q and k, got {:?} and {:?}",
            q.dims(),
            k.dims()
        )));
    };
    if pad.len() != b || hkv == 0 || hq % hkv != 0 || s < t {
        return Err(Error::Config(format!(
            "padded attention: {} pads for {b} rows, q {:?}, k {:?}",
            pad.len(),
            q.dims(),
            k.dims()
        )));
    }
    let g = hq / hkv;
    // Query head h uses K/V head h / g, and heads kv*g..(kv+1)*g are adjacent:
    // (B, Hq, T, D) -> (B, Hkv, g*T, D), then (B, Hkv, g*T, D) . (B, Hkv, S, D)^T -> (B, Hkv, g*T, S)
    let scores = q
        .reshape([b, hkv, g * t, d])?
        .matmul_t(k, false, true)?
        .scale(1.0 / (d as f64).sqrt())?;
    let mut mask = vec![0f32; b * hkv * g * t * s];
    for (row, m) in mask.chunks_mut(g * t * s).enumerate() {
        let p = pad[row / hkv];
        for (qi, keys) in m.chunks_mut(s).enumerate() {
            // Query qi % t sits at absolute position s - t + qi % t.
            let at = s - t + qi % t;
            for (j, x) in keys.iter_mut().enumerate() {
                if j > at || (j < p && j != at) {
                    *x = -1e30;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, [b, hkv, g * t, s], &q.device())?.to_dtype(scores.dtype())?;
    // (B, Hkv, g*T, S) . (B, Hkv, S, D) -> (B, Hkv, g*T, D) -> (B, Hq, T, D)
    Ok(scores
        .add(&mask)?
        .softmax()?
        .matmul(v)?
        .reshape([b, hq, t, d])?)
}

/// Inverted dropout: a constant mask of 0 (probability `p`) and `1 / (1 - p)`, shaped like `x`.
fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    let m: Vec<f64> = (0..x.numel())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Ok(
        Tensor::from_vec(m, x.dims().to_vec(), &bft_engine::Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(&x.device())?,
    )
}
