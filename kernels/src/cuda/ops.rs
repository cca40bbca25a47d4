//! Launchers: one function per CUDA entry point (its arguments in the kernel's order), plus
//! the cuBLAS GEMM. Sizes come from the caller, which has checked the shapes.

use super::typed::Float;
use super::{ATTENTION, Arg, CAST, Cuda, CudaError, DeviceBuffer, EMBEDDING, FLASH, LOSS, OPTIM};
use super::{RMSNORM, ROPE, Result, SWIGLU, ptr};
use crate::Half;
use crate::cpu::attention::AttnDims;
use crate::cpu::matmul::GemmDims;
use crate::cpu::optim::AdamWStep;
use std::sync::Arc;

const BLOCK: u32 = 256;
/// Rows per block in the warp-per-row attention kernels.
const ATTN_WARPS: usize = 4;

/// Blocks of `per_block` covering `n`; a grid beyond 2^32 blocks is an error, not a wrap.
fn blocks(n: usize, per_block: usize) -> Result<u32> {
    let b = n.div_ceil(per_block);
    u32::try_from(b).map_err(|_| CudaError::TooLarge(format!("a grid of {b} blocks")))
}

/// A size as the `int` a kernel takes.
fn i32_of(n: usize) -> Result<Arg> {
    i32::try_from(n)
        .map(Arg::I32)
        .map_err(|_| CudaError::TooLarge(format!("the size {n} (kernels index with int)")))
}

fn i64_of(n: usize) -> Arg {
    Arg::I64(n as i64)
}

/// `n` f32 values rounded to `half` (to nearest even).
pub fn narrow(dev: &Arc<Cuda>, x: &DeviceBuffer, n: usize, half: Half) -> Result<DeviceBuffer> {
    let y = dev.alloc(2 * n)?;
    let entry = match half {
        Half::BF16 => "f32_to_bf16_kernel",
        Half::F16 => "f32_to_f16_kernel",
    };
    let args = [ptr(Some(x)), ptr(Some(&y)), i64_of(n)];
    dev.launch(&CAST, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(y)
}

/// `n` 16-bit `half` values as f32 (exact).
pub fn widen(dev: &Arc<Cuda>, x: &DeviceBuffer, n: usize, half: Half) -> Result<DeviceBuffer> {
    let y = dev.alloc(4 * n)?;
    let entry = match half {
        Half::BF16 => "bf16_to_f32_kernel",
        Half::F16 => "f16_to_f32_kernel",
    };
    let args = [ptr(Some(x)), ptr(Some(&y)), i64_of(n)];
    dev.launch(&CAST, entry, blocks(n, 256)?, BLOCK, &args)?;
    Ok(y)
}

/// `(rows, dim)` rows of `table` picked by the device ids, copied as stored: elements of
/// `bytes` bytes (4 for f32, 2 for bf16 and f16).
pub fn embedding_forward(
    dev: &Arc<Cuda>,
    bytes: usize,
    table: &DeviceBuffer,
    ids: &DeviceBuffer,
    rows: usize,
    dim: usize,
) -> Result<DeviceBuffer> {
    let entry = match bytes {
        4 => "embedding_forward_b4",
        2 => "embedding_forward_b2",
        _ => {
            return Err(CudaError::Driver(format!(
                "no embedding kernel for {bytes}-byte elements"
            )));
        }
    };
    let out = dev.alloc(bytes * rows * dim)?;
    let args = [
        ptr(Some(table)),
        ptr(Some(ids)),
        ptr(Some(&out)),
        i32_of(rows)?,
        i32_of(dim)?,
    ];
    dev.launch(&EMBEDDING, entry, blocks(rows, 1)?, BLOCK, &args)?;
    Ok(out)
}

/// The f32 table gradient `(vocab, dim)` from `dout (rows, dim)` f32: positions grouped by id
/// on the host, one block per distinct id, no atomics.
pub fn embedding_backward(
    dev: &Arc<Cuda>,
    dout: &DeviceBuffer,
    ids: &[u32],
    vocab: usize,
    dim: usize,
) -> Result<DeviceBuffer> {
    let (start, positions) = crate::cpu::embedding::group_by_id(ids, vocab);
    let (mut unique, mut offsets) = (Vec::new(), vec![0u32]);
    for v in 0..vocab {
        if start[v + 1] > start[v] {
            unique.push(v as u32);
            offsets.push(start[v + 1]);
        }
    }
    let dtable = dev.zeros(4 * vocab * dim)?;
    let up = |v: &[u32]| dev.upload(bytemuck_u32(v));
    let (u, o, p) = (up(&unique)?, up(&offsets)?, up(&positions)?);
    let args = [
        ptr(Some(dout)),
        ptr(Some(&u)),
        ptr(Some(&o)),
        ptr(Some(&p)),
        ptr(Some(&dtable)),
        i32_of(unique.len())?,
        i32_of(dim)?,
    ];
    dev.launch(
        &EMBEDDING,
        "embedding_backward",
        blocks(unique.len(), 1)?,
        BLOCK,
        &args,
    )?;
    Ok(dtable)
}

fn bytemuck_u32(v: &[u32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// RMSNorm forward with the residual add fused: `(h, y, rstd)` where `h = x + res` is the new
/// residual stream (`None` without `res`: then `h` is `x`), `y` bf16, `rstd` f32 per row.
pub fn rmsnorm_forward(
    dev: &Arc<Cuda>,
    x: &DeviceBuffer,
    res: Option<&DeviceBuffer>,
    w: &DeviceBuffer,
    (rows, dim): (usize, usize),
    eps: f32,
) -> Result<(Option<DeviceBuffer>, DeviceBuffer, DeviceBuffer)> {
    let h = res.map(|_| dev.alloc(2 * rows * dim)).transpose()?;
    let y = dev.alloc(2 * rows * dim)?;
    let rstd = dev.alloc(4 * rows)?;
    let args = [
        ptr(Some(x)),
        ptr(res),
        ptr(Some(w)),
        ptr(h.as_ref()),
        ptr(Some(&y)),
        ptr(Some(&rstd)),
        i32_of(rows)?,
        i32_of(dim)?,
        Arg::F32(eps),
    ];
    dev.launch(&RMSNORM, "rmsnorm_forward", blocks(rows, 1)?, BLOCK, &args)?;
    Ok((h, y, rstd))
}

/// The gradient of the RMSNorm input (plus `dres`, the gradient along the residual stream).
pub fn rmsnorm_backward(
    dev: &Arc<Cuda>,
    dy: &DeviceBuffer,
    h: &DeviceBuffer,
    w: &DeviceBuffer,
    rstd: &DeviceBuffer,
    dres: Option<&DeviceBuffer>,
    (rows, dim): (usize, usize),
) -> Result<DeviceBuffer> {
    let dh = dev.alloc(2 * rows * dim)?;
    let args = [
        ptr(Some(dy)),
        ptr(Some(h)),
        ptr(Some(w)),
        ptr(Some(rstd)),
        ptr(dres),
        ptr(Some(&dh)),
        i32_of(rows)?,
        i32_of(dim)?,
    ];
    dev.launch(&RMSNORM, "rmsnorm_backward", blocks(rows, 1)?, BLOCK, &args)?;
    Ok(dh)
}

/// The f32 gradient of the RMSNorm gain.
pub fn rmsnorm_dw(
    dev: &Arc<Cuda>,
    dy: &DeviceBuffer,
    h: &DeviceBuffer,
    rstd: &DeviceBuffer,
    (rows, dim): (usize, usize),
) -> Result<DeviceBuffer> {
    let dw = dev.alloc(4 * dim)?;
    let args = [
        ptr(Some(dy)),
        ptr(Some(h)),
        ptr(Some(rstd)),
        ptr(Some(&dw)),
        i32_of(rows)?,
        i32_of(dim)?,
    ];
    dev.launch(&RMSNORM, "rmsnorm_dw", blocks(dim, 256)?, BLOCK, &args)?;
    Ok(dw)
}

/// RoPE in place on `x (rows_bh, t, d)` bf16 with `cos`, `sin (t, d / 2)` f32; `inverse` is
/// the backward.
pub fn rope(
    dev: &Arc<Cuda>,
    x: &DeviceBuffer,
    (cos, sin): (&DeviceBuffer, &DeviceBuffer),
    (rows_bh, t, d): (usize, usize, usize),
    inverse: bool,
) -> Result<()> {
    let pairs = rows_bh * t * (d / 2);
    let args = [
        ptr(Some(x)),
        ptr(Some(cos)),
        ptr(Some(sin)),
        i32_of(rows_bh)?,
        i32_of(t)?,
        i32_of(d)?,
        Arg::F32(if inverse { -1.0 } else { 1.0 }),
    ];
    dev.launch(&ROPE, "rope", blocks(pairs, 256)?, BLOCK, &args)
}

/// `silu(gate) * up`, bf16.
pub fn swiglu_forward(
    dev: &Arc<Cuda>,
    gate: &DeviceBuffer,
    up: &DeviceBuffer,
    n: usize,
) -> Result<DeviceBuffer> {
    let y = dev.alloc(2 * n)?;
    let args = [ptr(Some(gate)), ptr(Some(up)), ptr(Some(&y)), i64_of(n)];
    dev.launch(&SWIGLU, "swiglu_forward", blocks(n, 256)?, BLOCK, &args)?;
    Ok(y)
}

/// `(dgate, dup)`, bf16.
pub fn swiglu_backward(
    dev: &Arc<Cuda>,
    gate: &DeviceBuffer,
    up: &DeviceBuffer,
    dy: &DeviceBuffer,
    n: usize,
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    let (dg, du) = (dev.alloc(2 * n)?, dev.alloc(2 * n)?);
    let args = [
        ptr(Some(gate)),
        ptr(Some(up)),
        ptr(Some(dy)),
        ptr(Some(&dg)),
        ptr(Some(&du)),
        i64_of(n),
    ];
    dev.launch(&SWIGLU, "swiglu_backward", blocks(n, 256)?, BLOCK, &args)?;
    Ok((dg, du))
}

/// Whether the attention kernels take this head dimension: any up to 256.
pub fn attention_supports(head_dim: usize) -> bool {
    (1..=256).contains(&head_dim)
}

/// Which attention kernels run: the tensor-core flash kernels (`kernels/cuda/flash.cu`, head
/// sizes 64 and 128) or one warp per row (`kernels/cuda/attention.cu`, any head size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    Flash,
    Rows,
}

impl AttentionKernel {
    /// Flash where it takes the head size, unless BFT_CUDA_ATTENTION=rows asks for the rows
    /// kernels everywhere (to bisect a difference between the two).
    pub fn for_head_dim(head_dim: usize) -> Self {
        let rows = std::env::var("BFT_CUDA_ATTENTION").is_ok_and(|v| v == "rows");
        if !rows && flash_entries(head_dim).is_some() {
            AttentionKernel::Flash
        } else {
            AttentionKernel::Rows
        }
    }
}

/// The flash kernels' entry points for a head size (forward, dQ, dK/dV), if flash takes it.
fn flash_entries(head_dim: usize) -> Option<[&'static str; 3]> {
    match head_dim {
        64 => Some(["flash_forward_d64", "flash_dq_d64", "flash_dkv_d64"]),
        128 => Some(["flash_forward_d128", "flash_dq_d128", "flash_dkv_d128"]),
        _ => None,
    }
}

/// Threads of a flash block: 4 warps, 16 query rows (or keys) each.
const FLASH_THREADS: u32 = 128;
/// Query rows (forward, dQ) or keys (dK, dV) a flash block takes.
const FLASH_ROWS: usize = 64;

fn attention_dims(d: AttnDims, scale: f32) -> Result<[Arg; 7]> {
    Ok([
        i32_of(d.batch)?,
        i32_of(d.q_heads)?,
        i32_of(d.kv_heads)?,
        i32_of(d.q_len)?,
        i32_of(d.kv_len)?,
        i32_of(d.head_dim)?,
        Arg::F32(scale),
    ])
}

/// The flash kernels' size arguments: heads, lengths and the scale.
fn flash_dims(d: AttnDims, scale: f32) -> Result<[Arg; 5]> {
    Ok([
        i32_of(d.q_heads)?,
        i32_of(d.kv_heads)?,
        i32_of(d.q_len)?,
        i32_of(d.kv_len)?,
        Arg::F32(scale),
    ])
}

/// A grid of `(tiles of rows, heads)` for a flash kernel.
fn flash_grid(rows: usize, heads: usize) -> Result<(u32, u32)> {
    let y = u32::try_from(heads).map_err(|_| CudaError::TooLarge(format!("{heads} heads")))?;
    Ok((blocks(rows, FLASH_ROWS)?, y))
}

fn check_head_dim(d: usize) -> Result<()> {
    if attention_supports(d) {
        Ok(())
    } else {
        Err(CudaError::Driver(format!(
            "attention: head_dim {d} is not between 1 and 256"
        )))
    }
}

/// Causal GQA attention, bf16 `(o, lse f32)`, by the kernels that suit the head size.
pub fn attention_forward(
    dev: &Arc<Cuda>,
    dims: AttnDims,
    scale: f32,
    qkv: (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    let kernel = AttentionKernel::for_head_dim(dims.head_dim);
    attention_forward_by(dev, kernel, dims, scale, qkv)
}

/// `attention_forward` by the kernels asked for (flash falls back to rows where it does not
/// take the head size).
pub fn attention_forward_by(
    dev: &Arc<Cuda>,
    kernel: AttentionKernel,
    dims: AttnDims,
    scale: f32,
    (q, k, v): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    check_head_dim(dims.head_dim)?;
    let rows = dims.batch * dims.q_heads * dims.q_len;
    let o = dev.alloc(2 * rows * dims.head_dim)?;
    let lse = dev.alloc(4 * rows)?;
    if rows == 0 {
        return Ok((o, lse));
    }
    let mut args = vec![
        ptr(Some(q)),
        ptr(Some(k)),
        ptr(Some(v)),
        ptr(Some(&o)),
        ptr(Some(&lse)),
    ];
    let flash = flash_entries(dims.head_dim).filter(|_| kernel == AttentionKernel::Flash);
    if let Some([entry, ..]) = flash {
        args.extend(flash_dims(dims, scale)?);
        let grid = flash_grid(dims.q_len, dims.batch * dims.q_heads)?;
        dev.launch_grid(&FLASH, entry, grid, FLASH_THREADS, &args)?;
        return Ok((o, lse));
    }
    args.extend(attention_dims(dims, scale)?);
    let grid = blocks(rows, ATTN_WARPS)?;
    dev.launch(
        &ATTENTION,
        "attention_forward",
        grid,
        32 * ATTN_WARPS as u32,
        &args,
    )?;
    Ok((o, lse))
}

/// Attention backward from the saved `o` and `lse`: bf16 `(dq, dk, dv)`, by the kernels that
/// suit the head size.
pub fn attention_backward(
    dev: &Arc<Cuda>,
    dims: AttnDims,
    scale: f32,
    qkv: (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    saved: (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
    let kernel = AttentionKernel::for_head_dim(dims.head_dim);
    attention_backward_by(dev, kernel, dims, scale, qkv, saved)
}

/// `attention_backward` by the kernels asked for.
pub fn attention_backward_by(
    dev: &Arc<Cuda>,
    kernel: AttentionKernel,
    dims: AttnDims,
    scale: f32,
    (q, k, v): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    (o, lse, dout): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
    check_head_dim(dims.head_dim)?;
    let d = dims.head_dim;
    let rows = dims.batch * dims.q_heads * dims.q_len;
    let kv_rows = dims.batch * dims.kv_heads * dims.kv_len;
    let (dq, delta) = (dev.alloc(2 * rows * d)?, dev.alloc(4 * rows)?);
    let (dk, dv) = (dev.alloc(2 * kv_rows * d)?, dev.alloc(2 * kv_rows * d)?);
    if rows == 0 || kv_rows == 0 {
        return Ok((dq, dk, dv));
    }
    let flash = flash_entries(d).filter(|_| kernel == AttentionKernel::Flash);
    if let Some([_, dq_entry, dkv_entry]) = flash {
        let args = [
            ptr(Some(o)),
            ptr(Some(dout)),
            ptr(Some(&delta)),
            i64_of(rows),
            i32_of(d)?,
        ];
        let block = 32 * ATTN_WARPS as u32;
        dev.launch(
            &FLASH,
            "attention_delta",
            blocks(rows, ATTN_WARPS)?,
            block,
            &args,
        )?;
        let inputs = [ptr(Some(q)), ptr(Some(k)), ptr(Some(v)), ptr(Some(dout))];
        let saved = [ptr(Some(lse)), ptr(Some(&delta))];
        let sizes = flash_dims(dims, scale)?;
        let mut args: Vec<Arg> = inputs.iter().chain(&saved).copied().collect();
        args.push(ptr(Some(&dq)));
        args.extend(sizes);
        let grid = flash_grid(dims.q_len, dims.batch * dims.q_heads)?;
        dev.launch_grid(&FLASH, dq_entry, grid, FLASH_THREADS, &args)?;
        let mut args: Vec<Arg> = inputs.iter().chain(&saved).copied().collect();
        args.extend([ptr(Some(&dk)), ptr(Some(&dv))]);
        args.extend(sizes);
        let grid = flash_grid(dims.kv_len, dims.batch * dims.kv_heads)?;
        dev.launch_grid(&FLASH, dkv_entry, grid, FLASH_THREADS, &args)?;
        return Ok((dq, dk, dv));
    }
    let mut args = vec![
        ptr(Some(q)),
        ptr(Some(k)),
        ptr(Some(v)),
        ptr(Some(o)),
        ptr(Some(lse)),
        ptr(Some(dout)),
        ptr(Some(&dq)),
        ptr(Some(&delta)),
    ];
    args.extend(attention_dims(dims, scale)?);
    let block = 32 * ATTN_WARPS as u32;
    dev.launch(
        &ATTENTION,
        "attention_backward_dq",
        blocks(rows, ATTN_WARPS)?,
        block,
        &args,
    )?;
    let mut args = vec![
        ptr(Some(q)),
        ptr(Some(k)),
        ptr(Some(v)),
        ptr(Some(lse)),
        ptr(Some(dout)),
        ptr(Some(&delta)),
        ptr(Some(&dk)),
        ptr(Some(&dv)),
    ];
    args.extend(attention_dims(dims, scale)?);
    let grid = blocks(kv_rows, ATTN_WARPS)?;
    dev.launch(&ATTENTION, "attention_backward_dkv", grid, block, &args)?;
    Ok((dq, dk, dv))
}

/// A GEMM operand: a buffer, the element where the operand starts, and whether it is stored
/// transposed. Its element type is the GEMM's operand type (`GemmTypes`).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub buf: &'a DeviceBuffer,
    pub offset: usize,
    pub trans: bool,
}

impl<'a> Operand<'a> {
    pub fn new(buf: &'a DeviceBuffer, trans: bool) -> Self {
        Operand {
            buf,
            offset: 0,
            trans,
        }
    }

    fn ptr(&self, elem: Float) -> *const std::ffi::c_void {
        (self.buf.ptr() + (elem.bytes() * self.offset) as u64) as *const std::ffi::c_void
    }
}

/// The element types of a GEMM: both operands of one type (cuBLAS multiplies like with like),
/// the product of another or the same. Accumulation is f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmTypes {
    pub operands: Float,
    pub out: Float,
}

/// `c = op(a) . op(b)` for row-major bf16 operands, f32 accumulation, through cuBLAS; `c` is
/// f32 when `f32_out`, else bf16. `b_shared`: one `b` for every batch.
pub fn gemm(
    dev: &Arc<Cuda>,
    dims: GemmDims,
    a: Operand<'_>,
    b: (Operand<'_>, bool),
    f32_out: bool,
) -> Result<DeviceBuffer> {
    let out = if f32_out { Float::F32 } else { Float::Bf16 };
    let types = GemmTypes {
        operands: Float::Bf16,
        out,
    };
    let c = dev.alloc(dims.batch * dims.m * dims.n * out.bytes())?;
    gemm_into(dev, dims, (a, b), types, (&c, 0, false))?;
    Ok(c)
}

/// `c = op(a) . op(b)`, or `c += ..` when `accumulate`, for row-major operands of
/// `types.operands` and `c` of `types.out` (`batch * m * n` elements from element `c.1`,
/// checked), through cuBLAS with f32 accumulation (f32 operands multiply in full f32, not
/// TF32). `b.1`: one `b` for every batch.
pub fn gemm_into(
    dev: &Arc<Cuda>,
    dims: GemmDims,
    (a, (b, b_shared)): (Operand<'_>, (Operand<'_>, bool)),
    types: GemmTypes,
    (c, c_offset, accumulate): (&DeviceBuffer, usize, bool),
) -> Result<()> {
    let (trans_a, trans_b) = (a.trans, b.trans);
    use cudarc::cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
    };
    let GemmDims { batch, m, n, k } = dims;
    if c.len() < (c_offset + batch * m * n) * types.out.bytes() {
        return Err(CudaError::Driver(format!(
            "GEMM {dims:?}: the product buffer holds {} bytes",
            c.len()
        )));
    }
    if batch * m * n == 0 {
        return Ok(());
    }
    // Row-major C (m, n) is column-major C^T (n, m) = op(B)^T . op(A)^T: cuBLAS gets B first.
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let i = |v: usize| {
        i32::try_from(v)
            .map_err(|_| CudaError::TooLarge(format!("the GEMM size {v} (cuBLAS takes int)")))
    };
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    let ty = |f: Float| match f {
        Float::F32 => cudaDataType::CUDA_R_32F,
        Float::Bf16 => cudaDataType::CUDA_R_16BF,
    };
    let (ab_type, c_type) = (ty(types.operands), ty(types.out));
    let (ni, mi, ki, bi) = (i(n)?, i(m)?, i(k)?, i(batch)?);
    let ldb = i(if trans_b { k } else { n })?;
    let lda = i(if trans_a { m } else { k })?;
    let blas = dev.blas()?;
    // SAFETY: the pointers are live device buffers of at least the sizes the leading
    // dimensions and strides describe (batch * m * k, k * n or batch * k * n, batch * m * n
    // elements of the types given), alpha and beta are host f32 values (cuBLAS' default
    // pointer mode), and the handle's stream is the device's stream, so the GEMM is ordered
    // with the kernels.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            op(trans_b),
            op(trans_a),
            ni,
            mi,
            ki,
            (&alpha as *const f32).cast(),
            b.ptr(types.operands),
            ab_type,
            ldb,
            if b_shared { 0 } else { (k * n) as i64 },
            a.ptr(types.operands),
            ab_type,
            lda,
            (m * k) as i64,
            (&beta as *const f32).cast(),
            (c.ptr() + (c_offset * types.out.bytes()) as u64) as *mut std::ffi::c_void,
            c_type,
            ni,
            (m * n) as i64,
            bi,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| CudaError::Driver(format!("cuBLAS GEMM {dims:?}: {e:?}")))?;
    Ok(())
}

/// Pass 1 of the fused loss on a chunk of logits `z (rows, vocab)` f32: writes rows
/// `row0..row0 + rows` of `lse` and of the target logits `tl`.
#[allow(clippy::too_many_arguments)]
pub fn head_lse(
    dev: &Arc<Cuda>,
    z: &DeviceBuffer,
    targets: &DeviceBuffer,
    (lse, tl): (&DeviceBuffer, &DeviceBuffer),
    (rows, vocab, row0): (usize, usize, usize),
) -> Result<()> {
    let args = [
        ptr(Some(z)),
        ptr(Some(targets)),
        ptr(Some(lse)),
        ptr(Some(tl)),
        i32_of(rows)?,
        i32_of(vocab)?,
        i32_of(row0)?,
    ];
    dev.launch(&LOSS, "head_lse", blocks(rows, 1)?, BLOCK, &args)
}

/// Pass 2 on a recomputed chunk: bf16 `coef * (softmax - onehot)` (`with_target`), or
/// `coef * softmax` whose target term [`head_target_term`] adds in f32.
pub fn head_grad(
    dev: &Arc<Cuda>,
    z: &DeviceBuffer,
    targets: &DeviceBuffer,
    (lse, coef): (&DeviceBuffer, &DeviceBuffer),
    (rows, vocab, row0): (usize, usize, usize),
    with_target: bool,
) -> Result<DeviceBuffer> {
    let g = dev.alloc(2 * rows * vocab)?;
    let args = [
        ptr(Some(z)),
        ptr(Some(&g)),
        ptr(Some(targets)),
        ptr(Some(lse)),
        ptr(Some(coef)),
        i32_of(rows)?,
        i32_of(vocab)?,
        i32_of(row0)?,
        Arg::I32(i32::from(with_target)),
    ];
    dev.launch(&LOSS, "head_grad", blocks(rows, 1)?, BLOCK, &args)?;
    Ok(g)
}

/// `dx[r] -= coef[r] * w[y_r]` for the chunk's rows, in f32; the chunk's `(rows, hidden)` rows
/// of `dx` start at its element `dx.1`.
pub fn head_target_term(
    dev: &Arc<Cuda>,
    (dx, dx_offset): (&DeviceBuffer, usize),
    w: &DeviceBuffer,
    targets: &DeviceBuffer,
    coef: &DeviceBuffer,
    (rows, hidden, row0): (usize, usize, usize),
) -> Result<()> {
    if dx.len() < 4 * (dx_offset + rows * hidden) {
        return Err(CudaError::Driver(format!(
            "head_target_term: {} bytes of dx hold no {rows} x {hidden} rows from {dx_offset}",
            dx.len()
        )));
    }
    let args = [
        Arg::Ptr(dx.ptr() + 4 * dx_offset as u64),
        ptr(Some(w)),
        ptr(Some(targets)),
        ptr(Some(coef)),
        i32_of(rows)?,
        i32_of(hidden)?,
        i32_of(row0)?,
    ];
    dev.launch(&LOSS, "head_target_term", blocks(rows, 1)?, BLOCK, &args)
}

/// Per sample `(p_conf, s_b)` from the compacted valid tokens' log-probs `logp` and the
/// samples' token `offsets (batch + 1)` (u32, on the device).
pub fn sample_weights(
    dev: &Arc<Cuda>,
    logp: &DeviceBuffer,
    offsets: &DeviceBuffer,
    (batch, tokens): (usize, usize),
    (window, geometric, gamma): (usize, bool, f32),
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    let prefix = dev.alloc(8 * (tokens + batch))?;
    let (p_conf, s_b) = (dev.alloc(4 * batch)?, dev.alloc(4 * batch)?);
    let args = [
        ptr(Some(logp)),
        ptr(Some(offsets)),
        ptr(Some(&prefix)),
        ptr(Some(&p_conf)),
        ptr(Some(&s_b)),
        i32_of(batch)?,
        i32_of(window)?,
        Arg::I32(i32::from(geometric)),
        Arg::F32(gamma),
    ];
    dev.launch(&LOSS, "sample_weights", blocks(batch, 1)?, BLOCK, &args)?;
    Ok((p_conf, s_b))
}

/// Each valid token's loss coefficient `s_b w_t / (denom (n_b + 1e-8))`; `w_t = max(c_t, floor)`
/// when `token_weight`, else 1.
#[allow(clippy::too_many_arguments)]
pub fn token_coef(
    dev: &Arc<Cuda>,
    logp: &DeviceBuffer,
    sample_of: &DeviceBuffer,
    offsets: &DeviceBuffer,
    s_b: &DeviceBuffer,
    (tokens, denom): (usize, f32),
    token_weight: bool,
    floor: f32,
) -> Result<DeviceBuffer> {
    let coef = dev.alloc(4 * tokens)?;
    let args = [
        ptr(Some(logp)),
        ptr(Some(sample_of)),
        ptr(Some(offsets)),
        ptr(Some(s_b)),
        ptr(Some(&coef)),
        i32_of(tokens)?,
        Arg::F32(denom),
        Arg::I32(i32::from(token_weight)),
        Arg::F32(floor),
    ];
    dev.launch(&LOSS, "token_coef", blocks(tokens, 256)?, BLOCK, &args)?;
    Ok(coef)
}

/// `(batch, 3)` f32 per-sample sums over the valid tokens: `log c_t`, `w_t log c_t` and `w_t`
/// (`w_t` as in [`token_coef`]).
pub fn sample_sums(
    dev: &Arc<Cuda>,
    logp: &DeviceBuffer,
    offsets: &DeviceBuffer,
    batch: usize,
    token_weight: bool,
    floor: f32,
) -> Result<DeviceBuffer> {
    let sums = dev.alloc(4 * 3 * batch)?;
    let args = [
        ptr(Some(logp)),
        ptr(Some(offsets)),
        ptr(Some(&sums)),
        i32_of(batch)?,
        Arg::I32(i32::from(token_weight)),
        Arg::F32(floor),
    ];
    dev.launch(&LOSS, "sample_sums", blocks(batch, 1)?, BLOCK, &args)?;
    Ok(sums)
}

/// One fused AdamW step in place on f32 `master`, `m`, `v` from f32 `grad`; writes the bf16
/// working copy `weight` too when given.
pub fn adamw(
    dev: &Arc<Cuda>,
    (master, grad, m, v): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    weight: Option<&DeviceBuffer>,
    n: usize,
    h: &AdamWStep,
) -> Result<()> {
    let mut args = vec![
        ptr(Some(master)),
        ptr(Some(grad)),
        ptr(Some(m)),
        ptr(Some(v)),
        ptr(weight),
        i64_of(n),
    ];
    args.extend(h.kernel_scalars().map(Arg::F32));
    dev.launch(&OPTIM, "adamw", blocks(n, 256)?, BLOCK, &args)
}

/// `sum(x^2)` of each f32 `(buffer, length)`, with one read for all: per-block partials added
/// here in f64.
pub fn sum_squares(dev: &Arc<Cuda>, xs: &[(&DeviceBuffer, usize)]) -> Result<Vec<f64>> {
    // Up to 1024 blocks a tensor, each striding its share.
    let per: Vec<usize> = xs
        .iter()
        .map(|&(_, n)| n.div_ceil(256 * 16).clamp(1, 1024))
        .collect();
    let total: usize = per.iter().sum();
    let partial = dev.alloc(4 * total.max(1))?;
    let mut base = 0;
    for (&(x, n), &k) in xs.iter().zip(&per) {
        let args = [ptr(Some(x)), i64_of(n), ptr(Some(&partial)), i32_of(base)?];
        dev.launch(&OPTIM, "sum_squares", k as u32, BLOCK, &args)?;
        base += k;
    }
    let partials: Vec<f32> = bytemuck::pod_collect_to_vec(&dev.read(&partial)?);
    Ok(crate::cpu::optim::add_partials(&per, &partials))
}
