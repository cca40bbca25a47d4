// Data movement by element width (4 bytes: f32 and u32; 2 bytes: bf16 and f16), so one kernel
// serves every dtype of that width.
// permute: y (the permuted shape, row-major) from x; `meta` holds, for each of the `rank` axes
// of y, its size and then x's stride along it (2 * rank longs).
// slab: `rows` runs of `len` elements copied from src (row stride ss, offset so) into dst
// (row stride ds, offset do): narrow reads a slab, cat writes one per input.

template <typename E>
__device__ void permute_t(const E* x, E* y, const long long* meta, int rank, long long n) {
    const long long e = flat_id();
    if (e >= n) return;
    long long rem = e, src = 0;
    for (int a = rank - 1; a >= 0; --a) {
        const long long size = meta[a], stride = meta[rank + a];
        src += (rem % size) * stride;
        rem /= size;
    }
    y[e] = x[src];
}

template <typename E>
__device__ void slab_t(const E* src, E* dst, long long rows, long long len, long long ss,
                       long long so, long long ds, long long d0) {
    const long long e = flat_id();
    if (e >= rows * len) return;
    const long long r = e / len, c = e % len;
    dst[d0 + r * ds + c] = src[so + r * ss + c];
}

#define LAYOUT(E, S)                                                                           \
    extern "C" __global__ void permute_##S(const E* x, E* y, const long long* meta, int rank,  \
                                           long long n) {                                      \
        permute_t(x, y, meta, rank, n);                                                        \
    }                                                                                          \
    extern "C" __global__ void slab_##S(const E* src, E* dst, long long rows, long long len,    \
                                        long long ss, long long so, long long ds,              \
                                        long long d0) {                                        \
        slab_t(src, dst, rows, len, ss, so, ds, d0);                                           \
    }

LAYOUT(u32, b4)
LAYOUT(unsigned short, b2)
