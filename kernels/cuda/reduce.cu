// Sum and max over the middle axis of x viewed as (outer, n, inner), one thread per output,
// the axis read in order (deterministic) and accumulated in f32. Max keeps the index of the
// first maximal element, through which its backward routes the gradient.

template <typename T>
__device__ void reduce_sum_t(const T* x, T* out, long long outer, long long n, long long inner) {
    const long long j = flat_id();
    if (j >= outer * inner) return;
    const long long o = j / inner, i = j % inner;
    float s = 0.0f;
    for (long long k = 0; k < n; ++k) s += ld(x, (o * n + k) * inner + i);
    st(out, j, s);
}

template <typename T>
__device__ void reduce_max_t(const T* x, T* out, u32* idx, long long outer, long long n,
                             long long inner) {
    const long long j = flat_id();
    if (j >= outer * inner) return;
    const long long o = j / inner, i = j % inner;
    float m = ld(x, o * n * inner + i);
    u32 at = 0;
    for (long long k = 1; k < n; ++k) {
        const float v = ld(x, (o * n + k) * inner + i);
        if (v > m) { m = v; at = (u32)k; }
    }
    st(out, j, m);
    idx[j] = at;
}

// dx[o, k, i] = dy[o, i] (sum), or dy[o, i] where k is the saved argmax and 0 elsewhere (max).
template <typename T>
__device__ void reduce_backward_t(const T* dy, const u32* idx, T* dx, long long outer, long long n,
                                  long long inner) {
    const long long e = flat_id();
    if (e >= outer * n * inner) return;
    const long long i = e % inner, k = (e / inner) % n, o = e / (n * inner);
    const long long j = o * inner + i;
    st(dx, e, (idx == 0 || idx[j] == (u32)k) ? ld(dy, j) : 0.0f);
}

#define REDUCE(T, S)                                                                           \
    extern "C" __global__ void reduce_sum_##S(const T* x, T* out, long long outer, long long n, \
                                              long long inner) {                               \
        reduce_sum_t(x, out, outer, n, inner);                                                 \
    }                                                                                          \
    extern "C" __global__ void reduce_max_##S(const T* x, T* out, u32* idx, long long outer,   \
                                              long long n, long long inner) {                  \
        reduce_max_t(x, out, idx, outer, n, inner);                                            \
    }                                                                                          \
    extern "C" __global__ void reduce_backward_##S(const T* dy, const u32* idx, T* dx,         \
                                                   long long outer, long long n,               \
                                                   long long inner) {                          \
        reduce_backward_t(dy, idx, dx, outer, n, inner);                                       \
    }

REDUCE(float, f32)
REDUCE(bf16, bf16)
