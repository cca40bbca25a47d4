//! Launchers of the kernels instantiated for both storage types (f32 and bf16): elementwise,
//! softmax and the NLL, reductions, LayerNorm, and the layout kernels (by element width). Each
//! mirrors one `extern "C"` entry point, its arguments in the kernel's order; sizes come from
//! the engine, which has checked the shapes.

use super::{Arg, Cuda, CudaError, DeviceBuffer, ELEMENTWISE, LAYERNORM, LAYOUT, REDUCE, Result};
use super::{SOFTMAX, ptr};
use std::sync::Arc;

const BLOCK: u32 = 256;

/// The storage type of a typed kernel's float buffers; statistics are f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Float {
    F32,
    Bf16,
}

impl Float {
    pub fn bytes(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::Bf16 => 2,
        }
    }
    /// The entry point of this type among `[f32, bf16]`.
    fn pick(self, names: [&'static str; 2]) -> &'static str {
        names[self as usize]
    }
}

fn blocks(n: usize, per_block: usize) -> Result<u32> {
    let b = n.div_ceil(per_block);
    u32::try_from(b).map_err(|_| CudaError::TooLarge(format!("a grid of {b} blocks")))
}

fn int(n: usize) -> Result<Arg> {
    i32::try_from(n)
        .map(Arg::I32)
        .map_err(|_| CudaError::TooLarge(format!("the size {n} (kernels index with int)")))
}

fn long(n: usize) -> Arg {
    Arg::I64(n as i64)
}

/// `y = f(x)` for `n` elements; `kind` is the host enum's index (exp, log, sigmoid, silu,
/// neg, gelu).
pub fn unary(
    dev: &Arc<Cuda>,
    t: Float,
    kind: u32,
    x: &DeviceBuffer,
    n: usize,
) -> Result<DeviceBuffer> {
    let y = dev.alloc(t.bytes() * n)?;
    let args = [ptr(Some(x)), ptr(Some(&y)), long(n), Arg::I32(kind as i32)];
    let entry = t.pick(["unary_f32", "unary_bf16"]);
    dev.launch(&ELEMENTWISE, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(y)
}

/// `dx = dy * f'(x)` from the forward's input and output.
pub fn unary_backward(
    dev: &Arc<Cuda>,
    t: Float,
    kind: u32,
    (x, y, dy): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    n: usize,
) -> Result<DeviceBuffer> {
    let dx = dev.alloc(t.bytes() * n)?;
    let args = [
        ptr(Some(x)),
        ptr(Some(y)),
        ptr(Some(dy)),
        ptr(Some(&dx)),
        long(n),
        Arg::I32(kind as i32),
    ];
    let entry = t.pick(["unary_backward_f32", "unary_backward_bf16"]);
    dev.launch(&ELEMENTWISE, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(dx)
}

/// `a op b` for `n` elements of `a`, `b`'s `nb` elements repeated over the leading axes;
/// `kind` is add, sub, mul, div by index.
pub fn binary(
    dev: &Arc<Cuda>,
    t: Float,
    kind: u32,
    (a, b): (&DeviceBuffer, &DeviceBuffer),
    n: usize,
    nb: usize,
) -> Result<DeviceBuffer> {
    let out = dev.alloc(t.bytes() * n)?;
    let args = [
        ptr(Some(a)),
        ptr(Some(b)),
        ptr(Some(&out)),
        long(n),
        long(nb.max(1)),
        Arg::I32(kind as i32),
    ];
    let entry = t.pick(["binary_f32", "binary_bf16"]);
    dev.launch(&ELEMENTWISE, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(out)
}

/// `alpha * x`.
pub fn scale(
    dev: &Arc<Cuda>,
    t: Float,
    alpha: f32,
    x: &DeviceBuffer,
    n: usize,
) -> Result<DeviceBuffer> {
    let y = dev.alloc(t.bytes() * n)?;
    let args = [ptr(Some(x)), ptr(Some(&y)), long(n), Arg::F32(alpha)];
    let entry = t.pick(["scale_f32", "scale_bf16"]);
    dev.launch(&ELEMENTWISE, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(y)
}

/// The `cols` column sums of `a (rows, cols)`.
pub fn sum_rows(
    dev: &Arc<Cuda>,
    t: Float,
    a: &DeviceBuffer,
    rows: usize,
    cols: usize,
) -> Result<DeviceBuffer> {
    let out = dev.alloc(t.bytes() * cols)?;
    let args = [ptr(Some(a)), ptr(Some(&out)), long(rows), long(cols)];
    let entry = t.pick(["sum_rows_f32", "sum_rows_bf16"]);
    dev.launch(&ELEMENTWISE, entry, blocks(cols, 256)?, BLOCK, &args)?;
    Ok(out)
}

/// `dir (rows, cols)` with each row scaled by `g (rows)`.
pub fn scale_rows(
    dev: &Arc<Cuda>,
    t: Float,
    dir: &DeviceBuffer,
    g: &DeviceBuffer,
    n: usize,
    cols: usize,
) -> Result<DeviceBuffer> {
    let out = dev.alloc(t.bytes() * n)?;
    let args = [
        ptr(Some(dir)),
        ptr(Some(g)),
        ptr(Some(&out)),
        long(n),
        long(cols.max(1)),
    ];
    let entry = t.pick(["scale_rows_f32", "scale_rows_bf16"]);
    dev.launch(&ELEMENTWISE, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(out)
}

/// Softmax (or log-softmax) of each row of `x (rows, cols)`.
pub fn softmax(
    dev: &Arc<Cuda>,
    t: Float,
    x: &DeviceBuffer,
    (rows, cols): (usize, usize),
    log: bool,
) -> Result<DeviceBuffer> {
    let y = dev.alloc(t.bytes() * rows * cols)?;
    let args = [
        ptr(Some(x)),
        ptr(Some(&y)),
        int(rows)?,
        int(cols)?,
        Arg::I32(log as i32),
    ];
    let entry = t.pick(["softmax_f32", "softmax_bf16"]);
    dev.launch(&SOFTMAX, entry, blocks(rows, 1)?, BLOCK, &args)?;
    Ok(y)
}

/// The softmax's input gradient from its output `y` and `dy`.
pub fn softmax_backward(
    dev: &Arc<Cuda>,
    t: Float,
    (y, dy): (&DeviceBuffer, &DeviceBuffer),
    (rows, cols): (usize, usize),
    log: bool,
) -> Result<DeviceBuffer> {
    let dx = dev.alloc(t.bytes() * rows * cols)?;
    let args = [
        ptr(Some(y)),
        ptr(Some(dy)),
        ptr(Some(&dx)),
        int(rows)?,
        int(cols)?,
        Arg::I32(log as i32),
    ];
    let entry = t.pick(["softmax_backward_f32", "softmax_backward_bf16"]);
    dev.launch(&SOFTMAX, entry, blocks(rows, 1)?, BLOCK, &args)?;
    Ok(dx)
}

/// `(loss (rows), direction (rows, vocab))`: each row's NLL of its target (u32 ids, checked
/// in range by the caller) and `softmax - onehot`, which the backward scales per row.
pub fn nll(
    dev: &Arc<Cuda>,
    t: Float,
    z: &DeviceBuffer,
    targets: &DeviceBuffer,
    (rows, vocab): (usize, usize),
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    let (loss, dir) = (
        dev.alloc(t.bytes() * rows)?,
        dev.alloc(t.bytes() * rows * vocab)?,
    );
    let args = [
        ptr(Some(z)),
        ptr(Some(targets)),
        ptr(Some(&loss)),
        ptr(Some(&dir)),
        int(rows)?,
        int(vocab)?,
    ];
    let entry = t.pick(["nll_f32", "nll_bf16"]);
    dev.launch(&SOFTMAX, entry, blocks(rows, 1)?, BLOCK, &args)?;
    Ok((loss, dir))
}

/// The sum over the middle axis of `x (outer, n, inner)`.
pub fn reduce_sum(
    dev: &Arc<Cuda>,
    t: Float,
    x: &DeviceBuffer,
    (outer, n, inner): (usize, usize, usize),
) -> Result<DeviceBuffer> {
    let out = dev.alloc(t.bytes() * outer * inner)?;
    let args = [
        ptr(Some(x)),
        ptr(Some(&out)),
        long(outer),
        long(n),
        long(inner),
    ];
    let entry = t.pick(["reduce_sum_f32", "reduce_sum_bf16"]);
    dev.launch(&REDUCE, entry, blocks(outer * inner, 256)?, BLOCK, &args)?;
    Ok(out)
}

/// `(max, argmax as u32)` over the middle axis of `x (outer, n, inner)`, `n >= 1`.
pub fn reduce_max(
    dev: &Arc<Cuda>,
    t: Float,
    x: &DeviceBuffer,
    (outer, n, inner): (usize, usize, usize),
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    let (out, idx) = (
        dev.alloc(t.bytes() * outer * inner)?,
        dev.alloc(4 * outer * inner)?,
    );
    let args = [
        ptr(Some(x)),
        ptr(Some(&out)),
        ptr(Some(&idx)),
        long(outer),
        long(n),
        long(inner),
    ];
    let entry = t.pick(["reduce_max_f32", "reduce_max_bf16"]);
    dev.launch(&REDUCE, entry, blocks(outer * inner, 256)?, BLOCK, &args)?;
    Ok((out, idx))
}

/// The input gradient of a sum (`idx` none) or a max (`idx` the saved argmax).
pub fn reduce_backward(
    dev: &Arc<Cuda>,
    t: Float,
    dy: &DeviceBuffer,
    idx: Option<&DeviceBuffer>,
    (outer, n, inner): (usize, usize, usize),
) -> Result<DeviceBuffer> {
    let total = outer * n * inner;
    let dx = dev.alloc(t.bytes() * total)?;
    let args = [
        ptr(Some(dy)),
        ptr(idx),
        ptr(Some(&dx)),
        long(outer),
        long(n),
        long(inner),
    ];
    let entry = t.pick(["reduce_backward_f32", "reduce_backward_bf16"]);
    dev.launch(&REDUCE, entry, blocks(total, 256)?, BLOCK, &args)?;
    Ok(dx)
}

/// `(y, mean, rstd)`: LayerNorm of each row of `x (rows, dim)` with gain `w` and bias `b`.
pub fn layernorm(
    dev: &Arc<Cuda>,
    t: Float,
    (x, w, b): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    (rows, dim): (usize, usize),
    eps: f32,
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
    let y = dev.alloc(t.bytes() * rows * dim)?;
    let (mean, rstd) = (dev.alloc(4 * rows)?, dev.alloc(4 * rows)?);
    let args = [
        ptr(Some(x)),
        ptr(Some(w)),
        ptr(Some(b)),
        ptr(Some(&y)),
        ptr(Some(&mean)),
        ptr(Some(&rstd)),
        int(rows)?,
        int(dim)?,
        Arg::F32(eps),
    ];
    let entry = t.pick(["layernorm_f32", "layernorm_bf16"]);
    dev.launch(&LAYERNORM, entry, blocks(rows, 1)?, BLOCK, &args)?;
    Ok((y, mean, rstd))
}

/// LayerNorm's input gradient, and `(dw, db)` when `need_wb`.
#[allow(clippy::type_complexity)]
pub fn layernorm_backward(
    dev: &Arc<Cuda>,
    t: Float,
    (x, w, mean, rstd): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    dy: &DeviceBuffer,
    (rows, dim): (usize, usize),
    need_wb: bool,
) -> Result<(DeviceBuffer, Option<(DeviceBuffer, DeviceBuffer)>)> {
    let dx = dev.alloc(t.bytes() * rows * dim)?;
    let args = [
        ptr(Some(x)),
        ptr(Some(w)),
        ptr(Some(mean)),
        ptr(Some(rstd)),
        ptr(Some(dy)),
        ptr(Some(&dx)),
        int(rows)?,
        int(dim)?,
    ];
    let entry = t.pick(["layernorm_backward_f32", "layernorm_backward_bf16"]);
    dev.launch(&LAYERNORM, entry, blocks(rows, 1)?, BLOCK, &args)?;
    if !need_wb {
        return Ok((dx, None));
    }
    let (dw, db) = (dev.alloc(t.bytes() * dim)?, dev.alloc(t.bytes() * dim)?);
    let args = [
        ptr(Some(x)),
        ptr(Some(mean)),
        ptr(Some(rstd)),
        ptr(Some(dy)),
        ptr(Some(&dw)),
        ptr(Some(&db)),
        int(rows)?,
        int(dim)?,
    ];
    let entry = t.pick(["layernorm_dwb_f32", "layernorm_dwb_bf16"]);
    dev.launch(&LAYERNORM, entry, blocks(dim, 256)?, BLOCK, &args)?;
    Ok((dx, Some((dw, db))))
}

/// The element width of a layout kernel: 4 bytes (f32, u32) or 2 (bf16, f16).
fn width_entry(bytes: usize, names: [&'static str; 2]) -> Result<&'static str> {
    match bytes {
        4 => Ok(names[0]),
        2 => Ok(names[1]),
        _ => Err(CudaError::Driver(format!(
            "no layout kernel for {bytes}-byte elements"
        ))),
    }
}

/// `x` of shape `dims` with its axes permuted by `perm` (output axis a is input axis
/// `perm[a]`), for elements of `bytes` bytes.
pub fn permute(
    dev: &Arc<Cuda>,
    bytes: usize,
    x: &DeviceBuffer,
    dims: &[usize],
    perm: &[usize],
) -> Result<DeviceBuffer> {
    let n: usize = dims.iter().product();
    let mut strides = vec![1usize; dims.len()];
    for a in (0..dims.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * dims[a + 1];
    }
    let meta: Vec<i64> = perm
        .iter()
        .map(|&p| dims[p] as i64)
        .chain(perm.iter().map(|&p| strides[p] as i64))
        .collect();
    let meta = dev.upload(bytemuck::cast_slice(&meta))?;
    let y = dev.alloc(bytes * n)?;
    let args = [
        ptr(Some(x)),
        ptr(Some(&y)),
        ptr(Some(&meta)),
        int(dims.len())?,
        long(n),
    ];
    let entry = width_entry(bytes, ["permute_b4", "permute_b2"])?;
    dev.launch(&LAYOUT, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(y)
}

/// One strided block copy: `rows` runs of `len` elements, from `src` at `src_off` with row
/// stride `src_stride` into `dst` at `dst_off` with row stride `dst_stride`.
#[derive(Clone, Copy, Debug)]
pub struct Slab {
    pub rows: usize,
    pub len: usize,
    pub src_stride: usize,
    pub src_off: usize,
    pub dst_stride: usize,
    pub dst_off: usize,
}

/// Copies `s` from `src` into `dst`, elements of `bytes` bytes.
pub fn slab(
    dev: &Arc<Cuda>,
    bytes: usize,
    src: &DeviceBuffer,
    dst: &DeviceBuffer,
    s: Slab,
) -> Result<()> {
    let args = [
        ptr(Some(src)),
        ptr(Some(dst)),
        long(s.rows),
        long(s.len),
        long(s.src_stride),
        long(s.src_off),
        long(s.dst_stride),
        long(s.dst_off),
    ];
    let entry = width_entry(bytes, ["slab_b4", "slab_b2"])?;
    dev.launch(&LAYOUT, entry, blocks(s.rows * s.len, 256)?, BLOCK, &args)
}
