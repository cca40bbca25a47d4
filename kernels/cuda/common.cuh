// Helpers every kernel file shares: the loader prepends this file, and NVRTC compiles each
// kernel file on its own. No CUDA headers are needed: 16-bit floats travel as their bits in an
// unsigned short and convert by hand, rounding to nearest even like the host's `half` crate, so
// every backend stores the same bits. Arithmetic is f32; block sizes are multiples of 32.

typedef unsigned short bf16;
typedef unsigned short f16;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_to_f32(bf16 h) {
    return __uint_as_float(((u32)h) << 16);
}

__device__ __forceinline__ bf16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((b >> 16) | 0x40u); // NaN, made quiet
    }
    return (bf16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float f16_to_f32(f16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1fu;
    u32 m = (u32)h & 0x3ffu;
    if (e == 0u) {
        return __uint_as_float(sign | __float_as_uint((float)m * 5.9604645e-8f)); // m * 2^-24
    }
    if (e == 31u) {
        return __uint_as_float(sign | 0x7f800000u | (m << 13));
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

__device__ __forceinline__ f16 f32_to_f16(float x) {
    u32 b = __float_as_uint(x);
    u32 sign = (b >> 16) & 0x8000u;
    u32 a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return (f16)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (f16)(sign | 0x7c00u); // 65520 and up: infinity
    if (a >= 0x38800000u) {
        u32 m = a - 0x38000000u; // rebias 127 -> 15; a mantissa carry is the next binade
        return (f16)(sign | ((m + 0xfffu + ((m >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) return (f16)sign; // at most 2^-25: the even zero
    u32 e = a >> 23;
    u32 mant = (a & 0x7fffffu) | 0x800000u;
    u32 s = 126u - e; // subnormal: units of 2^-24
    u32 q = mant >> s;
    u32 rem = mant & ((1u << s) - 1u);
    u32 half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return (f16)(sign | q);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (every thread must call it; blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// Maximum over the block (same contract as block_sum).
__device__ float block_max(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : -3.402823466e38f;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// The flat index of a thread in a 1-D grid (grids past 2^31 elements are split by the host).
__device__ __forceinline__ long long flat_id() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// Loads and stores of either storage type as f32, so one templated kernel body serves f32 and
// bf16 tensors (the entry points are instantiated per type by the kernel files).
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, long long i, float v) { p[i] = f32_to_bf16(v); }
