// Elementwise ops, one thread per element, in f32 registers whatever the storage type. Kinds
// follow the host enums: unary 0 exp, 1 log, 2 sigmoid, 3 silu, 4 neg, 5 gelu (erf); binary
// 0 add, 1 sub, 2 mul, 3 div, with `b` broadcast over the leading axes (b index = i % nb).

__device__ __forceinline__ float sigm(float v) {
    return v >= 0.0f ? 1.0f / (1.0f + __expf(-v)) : __expf(v) / (1.0f + __expf(v));
}

__device__ __forceinline__ float unary_f(int kind, float x) {
    switch (kind) {
        case 0: return expf(x);
        case 1: return logf(x);
        case 2: return sigm(x);
        case 3: return x * sigm(x);
        case 4: return -x;
        default: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
}

// d f(x) / dx from the forward input x and output y.
__device__ __forceinline__ float unary_d(int kind, float x, float y) {
    switch (kind) {
        case 0: return y;
        case 1: return 1.0f / x;
        case 2: return y * (1.0f - y);
        case 3: { const float s = sigm(x); return s * (1.0f + x * (1.0f - s)); }
        case 4: return -1.0f;
        default:
            return 0.5f * (1.0f + erff(x * 0.70710678118654752f))
                 + x * 0.39894228040143268f * expf(-0.5f * x * x);
    }
}

__device__ __forceinline__ float binary_f(int kind, float a, float b) {
    switch (kind) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        default: return a / b;
    }
}

template <typename T>
__device__ void unary_t(const T* x, T* y, long long n, int kind) {
    const long long i = flat_id();
    if (i < n) st(y, i, unary_f(kind, ld(x, i)));
}

template <typename T>
__device__ void unary_backward_t(const T* x, const T* y, const T* dy, T* dx, long long n,
                                 int kind) {
    const long long i = flat_id();
    if (i < n) st(dx, i, ld(dy, i) * unary_d(kind, ld(x, i), ld(y, i)));
}

template <typename T>
__device__ void binary_t(const T* a, const T* b, T* out, long long n, long long nb, int kind) {
    const long long i = flat_id();
    if (i < n) st(out, i, binary_f(kind, ld(a, i), ld(b, i % nb)));
}

template <typename T>
__device__ void scale_t(const T* x, T* y, long long n, float alpha) {
    const long long i = flat_id();
    if (i < n) st(y, i, alpha * ld(x, i));
}

// out[c] = sum over rows of a[r * cols + c]: one thread per column, rows in order
// (deterministic), accumulated in f32.
template <typename T>
__device__ void sum_rows_t(const T* a, T* out, long long rows, long long cols) {
    const long long c = flat_id();
    if (c >= cols) return;
    float s = 0.0f;
    for (long long r = 0; r < rows; ++r) s += ld(a, r * cols + c);
    st(out, c, s);
}

// out[r, c] = dir[r, c] * g[r]: a per-row gradient spread over a saved direction.
template <typename T>
__device__ void scale_rows_t(const T* dir, const T* g, T* out, long long n, long long cols) {
    const long long i = flat_id();
    if (i < n) st(out, i, ld(dir, i) * ld(g, i / cols));
}

#define ELEMENTWISE(T, S)                                                                      \
    extern "C" __global__ void unary_##S(const T* x, T* y, long long n, int kind) {            \
        unary_t(x, y, n, kind);                                                                \
    }                                                                                          \
    extern "C" __global__ void unary_backward_##S(const T* x, const T* y, const T* dy, T* dx,  \
                                                  long long n, int kind) {                     \
        unary_backward_t(x, y, dy, dx, n, kind);                                               \
    }                                                                                          \
    extern "C" __global__ void binary_##S(const T* a, const T* b, T* out, long long n,         \
                                          long long nb, int kind) {                            \
        binary_t(a, b, out, n, nb, kind);                                                      \
    }                                                                                          \
    extern "C" __global__ void scale_##S(const T* x, T* y, long long n, float alpha) {         \
        scale_t(x, y, n, alpha);                                                               \
    }                                                                                          \
    extern "C" __global__ void sum_rows_##S(const T* a, T* out, long long rows, long long cols) { \
        sum_rows_t(a, out, rows, cols);                                                        \
    }                                                                                          \
    extern "C" __global__ void scale_rows_##S(const T* dir, const T* g, T* out, long long n,   \
                                              long long cols) {                                \
        scale_rows_t(dir, g, out, n, cols);                                                    \
    }

ELEMENTWISE(float, f32)
ELEMENTWISE(bf16, bf16)
