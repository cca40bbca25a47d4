//! Launchers: one function per WGSL entry point, taking device buffers and sizes and returning
//! new buffers (from the pool), mirroring the CPU kernels' signatures.

use super::{Gpu, GpuBuffer, GpuError, Result, Shader, grid};
use crate::Half;
use crate::cpu::binary::BinaryKind;
use crate::cpu::optim::AdamWStep;
use crate::cpu::unary::UnaryKind;
use std::sync::Arc;

/// A kernel file with `common.wgsl` (the shared helpers) in front of it.
macro_rules! shader {
    ($name:ident, $file:literal, [$($entry:literal),+]) => {
        pub static $name: Shader = Shader {
            name: $file,
            source: concat!(
                include_str!("../../wgsl/common.wgsl"),
                include_str!(concat!("../../wgsl/", $file, ".wgsl"))
            ),
            entries: &[$($entry),+],
        };
    };
}

shader!(
    ELEMENTWISE,
    "elementwise",
    ["unary", "binary", "scale_rows", "sum_rows"]
);
shader!(UNARY_BACKWARD, "unary_backward", ["unary_backward"]);
shader!(MATMUL, "matmul", ["matmul"]);
shader!(RMSNORM, "rmsnorm", ["rmsnorm"]);
shader!(RMSNORM_BACKWARD, "rmsnorm_backward", ["rmsnorm_dx"]);
shader!(RMSNORM_DW, "rmsnorm_dw", ["rmsnorm_dw"]);
shader!(LAYERNORM, "layernorm", ["layernorm"]);
shader!(LAYERNORM_BACKWARD, "layernorm_backward", ["layernorm_dx"]);
shader!(LAYERNORM_DWB, "layernorm_dwb", ["layernorm_dwb"]);
shader!(SOFTMAX, "softmax", ["softmax", "softmax_backward"]);
shader!(SWIGLU, "swiglu", ["swiglu", "swiglu_backward"]);
shader!(ROPE, "rope", ["rope"]);
shader!(LAYOUT, "layout", ["permute", "slab"]);
shader!(FILL, "fill", ["fill"]);
shader!(EMBEDDING, "embedding", ["gather"]);
shader!(EMBEDDING_BACKWARD, "embedding_backward", ["scatter_add"]);
shader!(HEAD_LSE, "head_lse", ["head_lse"]);
shader!(HEAD_GRAD, "head_grad", ["head_grad"]);
shader!(OPTIM, "optim", ["adamw"]);
shader!(REDUCE, "reduce", ["reduce_sum", "reduce_max"]);
shader!(CAST, "cast", ["narrow", "widen"]);
shader!(REDUCE_BACKWARD, "reduce_backward", ["reduce_backward"]);
shader!(SUM_SQUARES, "sum_squares", ["sum_squares"]);

/// The attention passes: the common helpers, the part all passes share (`attention.wgsl`), the
/// part the backward passes share (`attention_bwd.wgsl`), then the pass.
macro_rules! attention_pass {
    ($name:ident, [$($file:literal),+], $entry:literal) => {
        pub static $name: Shader = Shader {
            name: $entry,
            source: concat!(
                include_str!("../../wgsl/common.wgsl"),
                include_str!("../../wgsl/attention.wgsl"),
                $(include_str!(concat!("../../wgsl/", $file, ".wgsl"))),+
            ),
            entries: &[$entry],
        };
    };
}

attention_pass!(ATTENTION_FWD, ["attention_fwd"], "attn_fwd");
attention_pass!(
    ATTENTION_DQ,
    ["attention_bwd", "attention_dq"],
    "attn_bwd_dq"
);
attention_pass!(
    ATTENTION_DKV,
    ["attention_bwd", "attention_dkv"],
    "attn_bwd_dkv"
);

/// Every shader, so a test can compile them all.
pub static ALL: &[&Shader] = &[
    &ELEMENTWISE,
    &UNARY_BACKWARD,
    &MATMUL,
    &RMSNORM,
    &RMSNORM_BACKWARD,
    &RMSNORM_DW,
    &LAYERNORM,
    &LAYERNORM_BACKWARD,
    &LAYERNORM_DWB,
    &SOFTMAX,
    &SWIGLU,
    &ROPE,
    &LAYOUT,
    &FILL,
    &EMBEDDING,
    &EMBEDDING_BACKWARD,
    &ATTENTION_FWD,
    &ATTENTION_DQ,
    &ATTENTION_DKV,
    &HEAD_LSE,
    &HEAD_GRAD,
    &OPTIM,
    &SUM_SQUARES,
    &REDUCE,
    &REDUCE_BACKWARD,
    &CAST,
];

const F32: u64 = 4;

fn unary_code(kind: UnaryKind) -> u32 {
    match kind {
        UnaryKind::Exp => 0,
        UnaryKind::Log => 1,
        UnaryKind::Sigmoid => 2,
        UnaryKind::Silu => 3,
        UnaryKind::Neg => 4,
        UnaryKind::Gelu => 6,
    }
}

/// Code 5 in both unary shaders: `alpha * x`.
const SCALE: u32 = 5;

/// A size as the u32 a kernel parameter holds; larger sizes do not fit a storage binding.
fn u(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| GpuError::TooLarge(n))
}

/// `f(x)` elementwise over `n` values.
pub fn unary(g: &Arc<Gpu>, kind: UnaryKind, x: &GpuBuffer, n: usize) -> Result<GpuBuffer> {
    let y = g.alloc(n as u64 * F32);
    g.dispatch(
        &ELEMENTWISE,
        "unary",
        &[u(n)?, unary_code(kind), 0, 0],
        &[x, &y],
        grid(n, 256),
    )?;
    Ok(y)
}

/// `alpha * x`.
pub fn scale(g: &Arc<Gpu>, alpha: f32, x: &GpuBuffer, n: usize) -> Result<GpuBuffer> {
    let y = g.alloc(n as u64 * F32);
    let params = [u(n)?, SCALE, 0, alpha.to_bits()];
    g.dispatch(&ELEMENTWISE, "unary", &params, &[x, &y], grid(n, 256))?;
    Ok(y)
}

/// `dx = dy * f'(x)` from the forward input `x` and output `y`; `kind: None` is `scale` by
/// `alpha`.
pub fn unary_backward(
    g: &Arc<Gpu>,
    kind: Option<UnaryKind>,
    alpha: f32,
    x: &GpuBuffer,
    y: &GpuBuffer,
    dy: &GpuBuffer,
    n: usize,
) -> Result<GpuBuffer> {
    let dx = g.alloc(n as u64 * F32);
    let code = kind.map_or(SCALE, unary_code);
    let params = [u(n)?, code, 0, alpha.to_bits()];
    g.dispatch(
        &UNARY_BACKWARD,
        "unary_backward",
        &params,
        &[x, y, dy, &dx],
        grid(n, 256),
    )?;
    Ok(dx)
}

/// `out[i] = a[i] (op) b[i % nb]`: `b` (nb values) tiled over the `n` values of `a`.
pub fn binary(
    g: &Arc<Gpu>,
    kind: BinaryKind,
    a: &GpuBuffer,
    b: &GpuBuffer,
    n: usize,
    nb: usize,
) -> Result<GpuBuffer> {
    let out = g.alloc(n as u64 * F32);
    let code = match kind {
        BinaryKind::Add => 0,
        BinaryKind::Sub => 1,
        BinaryKind::Mul => 2,
        BinaryKind::Div => 3,
    };
    g.dispatch(
        &ELEMENTWISE,
        "binary",
        &[u(n)?, code, u(nb)?, 0],
        &[a, &out, b],
        grid(n, 256),
    )?;
    Ok(out)
}

/// `out[r, j] = a[r, j] * b[r]` for `a (n / cols, cols)`.
pub fn scale_rows(
    g: &Arc<Gpu>,
    a: &GpuBuffer,
    b: &GpuBuffer,
    n: usize,
    cols: usize,
) -> Result<GpuBuffer> {
    let out = g.alloc(n as u64 * F32);
    g.dispatch(
        &ELEMENTWISE,
        "scale_rows",
        &[u(n)?, 0, u(cols)?, 0],
        &[a, &out, b],
        grid(n, 256),
    )?;
    Ok(out)
}

/// `out[j] = sum_r a[r, j]` for `a (n / cols, cols)`.
pub fn sum_rows(g: &Arc<Gpu>, a: &GpuBuffer, n: usize, cols: usize) -> Result<GpuBuffer> {
    let out = g.alloc(cols as u64 * F32);
    g.dispatch(
        &ELEMENTWISE,
        "sum_rows",
        &[u(n)?, 0, u(cols)?, 0],
        &[a, &out],
        grid(cols, 256),
    )?;
    Ok(out)
}

/// One GEMM operand on the device: stored transposed or not, and the elements between its
/// batch matrices (0 broadcasts one matrix).
pub struct DeviceOperand<'a> {
    pub data: &'a GpuBuffer,
    pub trans: bool,
    pub batch_stride: usize,
}

/// `C (batch, m, n) = op(A) op(B)`, or `C += op(A) op(B)` into `acc`.
pub fn matmul(
    g: &Arc<Gpu>,
    dims: crate::cpu::matmul::GemmDims,
    a: DeviceOperand,
    b: DeviceOperand,
    acc: Option<GpuBuffer>,
) -> Result<GpuBuffer> {
    let crate::cpu::matmul::GemmDims { batch, m, n, k } = dims;
    let accumulate = u32::from(acc.is_some());
    let c = match acc {
        Some(c) => c,
        None => g.alloc((batch * m * n) as u64 * F32),
    };
    let params = [
        u(m)?,
        u(n)?,
        u(k)?,
        u32::from(a.trans),
        u32::from(b.trans),
        u(a.batch_stride)?,
        u(b.batch_stride)?,
        accumulate,
    ];
    let groups = [u(n.div_ceil(64))?, u(m.div_ceil(64))?, u(batch)?];
    g.dispatch(&MATMUL, "matmul", &params, &[a.data, b.data, &c], groups)?;
    Ok(c)
}

/// RMSNorm of `x (rows, cols)` by `w (cols)`: `(y, rstd (rows))`.
pub fn rmsnorm(
    g: &Arc<Gpu>,
    x: &GpuBuffer,
    w: &GpuBuffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let y = g.alloc((rows * cols) as u64 * F32);
    let rstd = g.alloc(rows as u64 * F32);
    let params = [u(rows)?, u(cols)?, eps.to_bits(), 0];
    g.dispatch(
        &RMSNORM,
        "rmsnorm",
        &params,
        &[x, w, &y, &rstd],
        grid(rows, 1),
    )?;
    Ok((y, rstd))
}

/// RMSNorm backward for `x (rows, cols)`: `dx`, and `dw` when `need_dw`.
pub fn rmsnorm_backward(
    g: &Arc<Gpu>,
    x: &GpuBuffer,
    w: &GpuBuffer,
    rstd: &GpuBuffer,
    dy: &GpuBuffer,
    (rows, cols): (usize, usize),
    need_dw: bool,
) -> Result<(GpuBuffer, Option<GpuBuffer>)> {
    let params = [u(rows)?, u(cols)?, 0, 0];
    let dx = g.alloc((rows * cols) as u64 * F32);
    g.dispatch(
        &RMSNORM_BACKWARD,
        "rmsnorm_dx",
        &params,
        &[x, w, rstd, dy, &dx],
        grid(rows, 1),
    )?;
    let dw = if need_dw {
        let dw = g.alloc(cols as u64 * F32);
        let groups = grid(cols, 256);
        g.dispatch(
            &RMSNORM_DW,
            "rmsnorm_dw",
            &params,
            &[x, rstd, dy, &dw],
            groups,
        )?;
        Some(dw)
    } else {
        None
    };
    Ok((dx, dw))
}

/// LayerNorm of `x (rows, cols)` by `w, b (cols)`: `(y, mean (rows), rstd (rows))`.
pub fn layernorm(
    g: &Arc<Gpu>,
    x: &GpuBuffer,
    w: &GpuBuffer,
    b: &GpuBuffer,
    (rows, cols): (usize, usize),
    eps: f32,
) -> Result<(GpuBuffer, GpuBuffer, GpuBuffer)> {
    let y = g.alloc((rows * cols) as u64 * F32);
    let mean = g.alloc(rows as u64 * F32);
    let rstd = g.alloc(rows as u64 * F32);
    let params = [u(rows)?, u(cols)?, eps.to_bits(), 0];
    g.dispatch(
        &LAYERNORM,
        "layernorm",
        &params,
        &[x, w, b, &y, &mean, &rstd],
        grid(rows, 1),
    )?;
    Ok((y, mean, rstd))
}

/// LayerNorm backward for `x (rows, cols)`: `dx`, and `(dw, db)` when `need_dwb`.
pub fn layernorm_backward(
    g: &Arc<Gpu>,
    [x, w, mean, rstd, dy]: [&GpuBuffer; 5],
    (rows, cols): (usize, usize),
    need_dwb: bool,
) -> Result<(GpuBuffer, Option<(GpuBuffer, GpuBuffer)>)> {
    let params = [u(rows)?, u(cols)?, 0, 0];
    let dx = g.alloc((rows * cols) as u64 * F32);
    g.dispatch(
        &LAYERNORM_BACKWARD,
        "layernorm_dx",
        &params,
        &[x, w, mean, rstd, dy, &dx],
        grid(rows, 1),
    )?;
    let dwb = if need_dwb {
        let (dw, db) = (g.alloc(cols as u64 * F32), g.alloc(cols as u64 * F32));
        g.dispatch(
            &LAYERNORM_DWB,
            "layernorm_dwb",
            &params,
            &[x, mean, rstd, dy, &dw, &db],
            grid(cols, 256),
        )?;
        Some((dw, db))
    } else {
        None
    };
    Ok((dx, dwb))
}

/// Softmax (or log-softmax) over the rows of `x (rows, cols)`.
pub fn softmax(
    g: &Arc<Gpu>,
    x: &GpuBuffer,
    rows: usize,
    cols: usize,
    log: bool,
) -> Result<GpuBuffer> {
    let y = g.alloc((rows * cols) as u64 * F32);
    let params = [u(rows)?, u(cols)?, u32::from(log), 0];
    g.dispatch(&SOFTMAX, "softmax", &params, &[x, &y], grid(rows, 1))?;
    Ok(y)
}

/// Softmax backward from the forward output `y`.
pub fn softmax_backward(
    g: &Arc<Gpu>,
    y: &GpuBuffer,
    dy: &GpuBuffer,
    rows: usize,
    cols: usize,
    log: bool,
) -> Result<GpuBuffer> {
    let dx = g.alloc((rows * cols) as u64 * F32);
    let params = [u(rows)?, u(cols)?, u32::from(log), 0];
    g.dispatch(
        &SOFTMAX,
        "softmax_backward",
        &params,
        &[y, &dx, dy],
        grid(rows, 1),
    )?;
    Ok(dx)
}

/// `silu(gate) * up` over `n` values.
pub fn swiglu(g: &Arc<Gpu>, gate: &GpuBuffer, up: &GpuBuffer, n: usize) -> Result<GpuBuffer> {
    let y = g.alloc(n as u64 * F32);
    g.dispatch(
        &SWIGLU,
        "swiglu",
        &[u(n)?, 0, 0, 0],
        &[gate, up, &y],
        grid(n, 256),
    )?;
    Ok(y)
}

/// SwiGLU backward: `(dgate, dup)`.
pub fn swiglu_backward(
    g: &Arc<Gpu>,
    gate: &GpuBuffer,
    up: &GpuBuffer,
    dy: &GpuBuffer,
    n: usize,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let (dgate, dup) = (g.alloc(n as u64 * F32), g.alloc(n as u64 * F32));
    let bufs = [gate, up, &dgate, dy, &dup];
    g.dispatch(
        &SWIGLU,
        "swiglu_backward",
        &[u(n)?, 0, 0, 0],
        &bufs,
        grid(n, 256),
    )?;
    Ok((dgate, dup))
}

/// RoPE of `x (rows, t, d)` with `cos, sin (t, d / 2)`; `inverse` is the backward rotation.
pub fn rope(
    g: &Arc<Gpu>,
    x: &GpuBuffer,
    cos: &GpuBuffer,
    sin: &GpuBuffer,
    (rows, t, d): (usize, usize, usize),
    inverse: bool,
) -> Result<GpuBuffer> {
    let y = g.alloc((rows * t * d) as u64 * F32);
    let pairs = rows * t * (d / 2);
    let params = [u(pairs)?, u(t)?, u(d / 2)?, u32::from(inverse)];
    g.dispatch(&ROPE, "rope", &params, &[x, cos, sin, &y], grid(pairs, 256))?;
    Ok(y)
}

/// Most axes a permutation on the device handles.
pub const MAX_RANK: usize = 6;

/// `x` (contiguous, 32-bit elements, shape `dims`) with its axes permuted: the output has shape
/// `dims[perm[0]], dims[perm[1]], ...`. Ranks above `MAX_RANK` are refused by the caller.
pub fn permute(g: &Arc<Gpu>, x: &GpuBuffer, dims: &[usize], perm: &[usize]) -> Result<GpuBuffer> {
    let rank = dims.len();
    assert!(rank <= MAX_RANK && perm.len() == rank);
    let n: usize = dims.iter().product();
    let mut in_strides = vec![1usize; rank];
    for a in (0..rank.saturating_sub(1)).rev() {
        in_strides[a] = in_strides[a + 1] * dims[a + 1];
    }
    let mut params = vec![u(n)?, u(rank)?, 0, 0, 0, 0, 0, 0];
    let mut out_dims = [1u32; MAX_RANK];
    let mut strides = [0u32; MAX_RANK];
    for (a, &pa) in perm.iter().enumerate() {
        out_dims[a] = u(dims[pa])?;
        strides[a] = u(in_strides[pa])?;
    }
    params.extend(out_dims);
    params.extend(strides);
    let y = g.alloc(n as u64 * 4);
    g.dispatch(&LAYOUT, "permute", &params, &[x, &y], grid(n, 256))?;
    Ok(y)
}

/// Where a slab copy reads and writes: `src (outer, src_dim, inner)` from `src_at`, into
/// `dst (outer, dst_dim, inner)` at `dst_at`, `len` steps of the middle axis.
#[derive(Clone, Copy, Debug)]
pub struct Slab {
    pub outer: usize,
    pub inner: usize,
    pub len: usize,
    pub src_dim: usize,
    pub src_at: usize,
    pub dst_dim: usize,
    pub dst_at: usize,
}

/// Copies a slab of `src` into `dst` (narrow reads one, cat writes one per input).
pub fn slab(g: &Arc<Gpu>, src: &GpuBuffer, dst: &GpuBuffer, s: Slab) -> Result<()> {
    let n = s.outer * s.len * s.inner;
    let mut params = vec![
        u(n)?,
        0,
        u(s.src_dim)?,
        u(s.src_at)?,
        u(s.dst_dim)?,
        u(s.dst_at)?,
        u(s.len.max(1))?,
        u(s.inner.max(1))?,
    ];
    params.extend([0u32; 2 * MAX_RANK]);
    g.dispatch(&LAYOUT, "slab", &params, &[src, dst], grid(n, 256))
}

/// A buffer of `n` 32-bit elements all holding `bits` (`0` is f32 zero and u32 zero).
pub fn fill(g: &Arc<Gpu>, n: usize, bits: u32) -> Result<GpuBuffer> {
    let y = g.alloc(n as u64 * 4);
    g.dispatch(&FILL, "fill", &[u(n)?, bits, 0, 0], &[&y], grid(n, 256))?;
    Ok(y)
}

/// Rows `ids` of `table (vocab, dim)`: `(ids.len(), dim)`. The ids are checked by the caller.
pub fn gather(g: &Arc<Gpu>, table: &GpuBuffer, dim: usize, ids: &[u32]) -> Result<GpuBuffer> {
    let n = ids.len() * dim;
    let out = g.alloc(n as u64 * F32);
    let ids = g.upload(bytemuck::cast_slice(ids))?;
    g.dispatch(
        &EMBEDDING,
        "gather",
        &[u(n)?, u(dim)?, 0, 0],
        &[table, &ids, &out],
        grid(n, 256),
    )?;
    Ok(out)
}

/// `dtable (vocab, dim)` with `dtable[ids[i]] += dout[i]`, summed in token order per row.
pub fn scatter_add(
    g: &Arc<Gpu>,
    dout: &GpuBuffer,
    dim: usize,
    ids: &[u32],
    vocab: usize,
) -> Result<GpuBuffer> {
    // Grouped on the host: the ids are few next to the table.
    let (start, tokens) = crate::cpu::embedding::group_by_id(ids, vocab);
    let n = vocab * dim;
    let out = g.alloc(n as u64 * F32);
    let (start, tokens) = (
        g.upload(bytemuck::cast_slice(&start))?,
        g.upload(bytemuck::cast_slice(&tokens))?,
    );
    let bufs = [dout, &start, &tokens, &out];
    g.dispatch(
        &EMBEDDING_BACKWARD,
        "scatter_add",
        &[u(n)?, u(dim)?, 0, 0],
        &bufs,
        grid(n, 256),
    )?;
    Ok(out)
}

/// Sum over the axis of `x` viewed as `(outer, size, inner)`: `(outer, inner)` values.
pub fn reduce_sum(g: &Arc<Gpu>, x: &GpuBuffer, sizes: (usize, usize, usize)) -> Result<GpuBuffer> {
    let (outer, size, inner) = sizes;
    let y = g.alloc((outer * inner) as u64 * F32);
    let params = [u(outer)?, u(size)?, u(inner)?, 0];
    g.dispatch(
        &REDUCE,
        "reduce_sum",
        &params,
        &[x, &y],
        grid(outer * inner, 1),
    )?;
    Ok(y)
}

/// Maximum over the axis of `x` viewed as `(outer, size, inner)`, and the index (u32) of its
/// first occurrence. `size` must be at least 1.
pub fn reduce_max(
    g: &Arc<Gpu>,
    x: &GpuBuffer,
    sizes: (usize, usize, usize),
) -> Result<(GpuBuffer, GpuBuffer)> {
    let (outer, size, inner) = sizes;
    let y = g.alloc((outer * inner) as u64 * F32);
    let idx = g.alloc((outer * inner) as u64 * F32);
    let params = [u(outer)?, u(size)?, u(inner)?, 1];
    g.dispatch(
        &REDUCE,
        "reduce_max",
        &params,
        &[x, &y, &idx],
        grid(outer * inner, 1),
    )?;
    Ok((y, idx))
}

/// The gradient of [`reduce_sum`] (`argmax: None`) or [`reduce_max`] (its indices) from
/// `grad (outer, inner)`: `(outer, size, inner)` values.
pub fn reduce_backward(
    g: &Arc<Gpu>,
    grad: &GpuBuffer,
    argmax: Option<&GpuBuffer>,
    sizes: (usize, usize, usize),
) -> Result<GpuBuffer> {
    let (outer, size, inner) = sizes;
    let n = outer * size * inner;
    let dx = g.alloc(n as u64 * F32);
    let params = [u(outer)?, u(size)?, u(inner)?, u32::from(argmax.is_some())];
    // A sum reads no indices, but the binding must hold a buffer: the gradient stands in.
    let idx = argmax.unwrap_or(grad);
    g.dispatch(
        &REDUCE_BACKWARD,
        "reduce_backward",
        &params,
        &[grad, idx, &dx],
        grid(n, 256),
    )?;
    Ok(dx)
}

/// Per row of logits `(rows, vocab)`: `lse(z) - z[y]`, and `softmax(z) - onehot(y)`, the
/// direction of the row's gradient (times its loss gradient), in a buffer of its own.
pub fn nll(
    g: &Arc<Gpu>,
    logits: &GpuBuffer,
    targets: &GpuBuffer,
    rows: usize,
    vocab: usize,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let dir = g.copy(logits)?;
    let (lse, tl) = (g.alloc(rows as u64 * F32), g.alloc(rows as u64 * F32));
    g.dispatch(
        &HEAD_LSE,
        "head_lse",
        &[u(rows)?, u(vocab)?, 1, 0],
        &[&dir, targets, &lse, &tl],
        grid(rows, 1),
    )?;
    Ok((binary(g, BinaryKind::Sub, &lse, &tl, rows, rows)?, dir))
}

/// Largest head dimension the attention kernels hold in registers.
pub const MAX_HEAD_DIM: usize = 256;

/// Whether the attention kernels take this head dimension: a multiple of 4 (rows are read as
/// vec4), at most [`MAX_HEAD_DIM`].
pub fn attention_supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(4) && head_dim <= MAX_HEAD_DIM
}

fn attention_params(dims: crate::cpu::attention::AttnDims, scale: f32) -> Result<[u32; 8]> {
    Ok([
        u(dims.batch)?,
        u(dims.q_heads)?,
        u(dims.kv_heads)?,
        u(dims.q_len)?,
        u(dims.kv_len)?,
        u(dims.head_dim / 4)?,
        scale.to_bits(),
        0,
    ])
}

/// Causal GQA attention: `(o (B, Hq, T, D), lse (B * Hq * T))`. The caller checks the shapes
/// and [`attention_supports`] the head dimension.
pub fn attention_forward(
    g: &Arc<Gpu>,
    dims: crate::cpu::attention::AttnDims,
    scale: f32,
    (q, k, v): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
) -> Result<(GpuBuffer, GpuBuffer)> {
    let rows = dims.batch * dims.q_heads * dims.q_len;
    let o = g.alloc((rows * dims.head_dim) as u64 * F32);
    let lse = g.alloc(rows as u64 * F32);
    let params = attention_params(dims, scale)?;
    g.dispatch(
        &ATTENTION_FWD,
        "attn_fwd",
        &params,
        &[q, k, v, &o, &lse],
        grid(rows, 64),
    )?;
    Ok((o, lse))
}

/// Attention backward from the saved `o` and `lse`: `(dq, dk, dv)`.
pub fn attention_backward(
    g: &Arc<Gpu>,
    dims: crate::cpu::attention::AttnDims,
    scale: f32,
    (q, k, v): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
    (o, lse, dout): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
) -> Result<(GpuBuffer, GpuBuffer, GpuBuffer)> {
    let rows = dims.batch * dims.q_heads * dims.q_len;
    let kv_rows = dims.batch * dims.kv_heads * dims.kv_len;
    let d = dims.head_dim;
    let params = attention_params(dims, scale)?;
    let dq = g.alloc((rows * d) as u64 * F32);
    let delta = g.alloc(rows as u64 * F32);
    let bufs = [q, k, v, dout, lse, o, &dq, &delta];
    g.dispatch(&ATTENTION_DQ, "attn_bwd_dq", &params, &bufs, grid(rows, 64))?;
    let dk = g.alloc((kv_rows * d) as u64 * F32);
    let dv = g.alloc((kv_rows * d) as u64 * F32);
    let bufs = [q, k, v, dout, lse, &delta, &dk, &dv];
    g.dispatch(
        &ATTENTION_DKV,
        "attn_bwd_dkv",
        &params,
        &bufs,
        grid(kv_rows, 64),
    )?;
    Ok((dq, dk, dv))
}

/// What pass 1 of the fused LM-head loss returns: per row the log-sum-exp and the target's
/// logit, and with `unit` each row's gradient direction `(softmax - onehot) W` (n, C).
pub struct HeadForward {
    pub lse: GpuBuffer,
    pub target_logit: GpuBuffer,
    pub unit: Option<GpuBuffer>,
}

/// One chunk of the fused loss: rows `r0..r0 + n` of `x (rows, C)` copied out, their logits
/// `z (n, V) = x W^T`, and their targets on the device.
struct Chunk {
    xs: GpuBuffer,
    z: GpuBuffer,
    targets: GpuBuffer,
}

fn chunk_logits(
    g: &Arc<Gpu>,
    dims: crate::cpu::lm_head::HeadDims,
    (x, head, targets): (&GpuBuffer, &GpuBuffer, &[u32]),
    (r0, n): (usize, usize),
) -> Result<Chunk> {
    use crate::cpu::matmul::GemmDims;
    let (rows, c, v) = (dims.rows, dims.hidden, dims.vocab);
    let xs = g.alloc((n * c) as u64 * F32);
    let rows_of = Slab {
        outer: 1,
        inner: c,
        len: n,
        src_dim: rows,
        src_at: r0,
        dst_dim: n,
        dst_at: 0,
    };
    slab(g, x, &xs, rows_of)?;
    let gemm = GemmDims {
        batch: 1,
        m: n,
        n: v,
        k: c,
    };
    let operand = |data, trans| DeviceOperand {
        data,
        trans,
        batch_stride: 0,
    };
    let z = matmul(g, gemm, operand(&xs, false), operand(head, true), None)?;
    let targets = g.upload(bytemuck::cast_slice(&targets[r0..r0 + n]))?;
    Ok(Chunk { xs, z, targets })
}

/// Pass 1 of the fused loss over `x (n, C)` and `head (V, C)`, `chunk` rows of logits at a time
/// (the only vocabulary-sized buffer).
pub fn head_forward(
    g: &Arc<Gpu>,
    dims: crate::cpu::lm_head::HeadDims,
    chunk: usize,
    inputs: (&GpuBuffer, &GpuBuffer, &[u32]),
    unit: bool,
) -> Result<HeadForward> {
    use crate::cpu::matmul::GemmDims;
    let (rows, c, v) = (dims.rows, dims.hidden, dims.vocab);
    let lse = g.alloc(rows as u64 * F32);
    let tl = g.alloc(rows as u64 * F32);
    let unit_buf = unit.then(|| g.alloc((rows * c) as u64 * F32));
    for r0 in (0..rows).step_by(chunk.max(1)) {
        let n = chunk.max(1).min(rows - r0);
        let ch = chunk_logits(g, dims, inputs, (r0, n))?;
        let params = [u(n)?, u(v)?, u32::from(unit), u(r0)?];
        let bufs = [&ch.z, &ch.targets, &lse, &tl];
        g.dispatch(&HEAD_LSE, "head_lse", &params, &bufs, grid(n, 1))?;
        if let Some(ub) = &unit_buf {
            // (n, V) . (V, C) -> (n, C), placed at rows r0.. of the unit buffer.
            let gemm = GemmDims {
                batch: 1,
                m: n,
                n: c,
                k: v,
            };
            let a = DeviceOperand {
                data: &ch.z,
                trans: false,
                batch_stride: 0,
            };
            let b = DeviceOperand {
                data: inputs.1,
                trans: false,
                batch_stride: 0,
            };
            let uc = matmul(g, gemm, a, b, None)?;
            let into = Slab {
                outer: 1,
                inner: c,
                len: n,
                src_dim: n,
                src_at: 0,
                dst_dim: rows,
                dst_at: r0,
            };
            slab(g, &uc, ub, into)?;
        }
    }
    Ok(HeadForward {
        lse,
        target_logit: tl,
        unit: unit_buf,
    })
}

/// Pass 2 for the head: `dW (V, C) = sum over chunks of (coef * (softmax - onehot))^T x`.
pub fn head_backward_weight(
    g: &Arc<Gpu>,
    dims: crate::cpu::lm_head::HeadDims,
    chunk: usize,
    inputs: (&GpuBuffer, &GpuBuffer, &[u32]),
    (lse, coef): (&GpuBuffer, &GpuBuffer),
) -> Result<GpuBuffer> {
    use crate::cpu::matmul::GemmDims;
    let (rows, c, v) = (dims.rows, dims.hidden, dims.vocab);
    let mut dw = fill(g, v * c, 0)?;
    for r0 in (0..rows).step_by(chunk.max(1)) {
        let n = chunk.max(1).min(rows - r0);
        let ch = chunk_logits(g, dims, inputs, (r0, n))?;
        let params = [u(n * v)?, u(v)?, u(r0)?, 0];
        let bufs = [&ch.z, &ch.targets, lse, coef];
        g.dispatch(&HEAD_GRAD, "head_grad", &params, &bufs, grid(n * v, 256))?;
        // (n, V)^T . (n, C) -> (V, C), accumulated.
        let gemm = GemmDims {
            batch: 1,
            m: v,
            n: c,
            k: n,
        };
        let a = DeviceOperand {
            data: &ch.z,
            trans: true,
            batch_stride: 0,
        };
        let b = DeviceOperand {
            data: &ch.xs,
            trans: false,
            batch_stride: 0,
        };
        dw = matmul(g, gemm, a, b, Some(dw))?;
    }
    Ok(dw)
}

/// One AdamW step of `n` parameters `w` with gradient `grad` and moments `m`, `v`, all updated
/// in place.
pub fn adamw(
    g: &Arc<Gpu>,
    w: &GpuBuffer,
    grad: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
    n: usize,
    h: &AdamWStep,
) -> Result<()> {
    let mut params = vec![u(n)?];
    params.extend(h.kernel_scalars().map(f32::to_bits));
    g.dispatch(&OPTIM, "adamw", &params, &[w, grad, m, v], grid(n, 256))
}

/// Values per workgroup of `sum_squares.wgsl` (its `SPAN`).
const SQUARES_SPAN: usize = 16384;

/// `sum(x^2)` of each `(buffer, length)`, with one read of the device for all of them: each
/// tensor's workgroups leave f32 partials, which are added here in f64.
pub fn sum_squares(g: &Arc<Gpu>, xs: &[(&GpuBuffer, usize)]) -> Result<Vec<f64>> {
    let groups: Vec<usize> = xs.iter().map(|&(_, n)| n.div_ceil(SQUARES_SPAN)).collect();
    let total: usize = groups.iter().sum();
    if total == 0 {
        return Ok(vec![0.0; xs.len()]);
    }
    let partial = g.alloc((total as u64) * F32);
    let mut base = 0;
    for (&(x, n), &k) in xs.iter().zip(&groups) {
        g.dispatch(
            &SUM_SQUARES,
            "sum_squares",
            &[u(n)?, u(base)?],
            &[x, &partial],
            grid(k, 1),
        )?;
        base += k;
    }
    let partials: Vec<f32> = bytemuck::pod_collect_to_vec(&g.read(&partial)?);
    Ok(crate::cpu::optim::add_partials(&groups, &partials))
}

/// `cast.wgsl`'s code for a 16-bit format (a wgpu buffer holds two to a u32 word).
fn half_code(half: Half) -> u32 {
    match half {
        Half::F16 => 0,
        Half::BF16 => 1,
    }
}

/// Bytes of `n` 16-bit values (whole u32 words).
pub fn half_bytes(n: usize) -> u64 {
    n.div_ceil(2) as u64 * 4
}

/// `n` f32 values rounded to `half` (to nearest even, like the `half` crate).
pub fn narrow(g: &Arc<Gpu>, x: &GpuBuffer, n: usize, half: Half) -> Result<GpuBuffer> {
    let out = g.alloc(half_bytes(n));
    g.dispatch(
        &CAST,
        "narrow",
        &[u(n)?, half_code(half)],
        &[&out, x],
        grid(n.div_ceil(2), 256),
    )?;
    Ok(out)
}

/// `n` 16-bit `half` values as f32 (exact).
pub fn widen(g: &Arc<Gpu>, x: &GpuBuffer, n: usize, half: Half) -> Result<GpuBuffer> {
    let out = g.alloc(n as u64 * F32);
    g.dispatch(
        &CAST,
        "widen",
        &[u(n)?, half_code(half)],
        &[x, &out],
        grid(n, 256),
    )?;
    Ok(out)
}
