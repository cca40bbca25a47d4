// LayerNorm over the last axis with gain w and bias b, one block per row, statistics in f32:
//   y = (x - mean) * rstd * w + b, mean and rstd saved per row.
// Backward, one block per row: with xh = (x - mean) * rstd and g = dy * w,
//   dx = rstd * (g - mean(g) - xh * mean(g * xh)).
// dw = sum over rows of dy * xh, db = sum of dy: one thread per column, rows in order.

template <typename T>
__device__ void layernorm_t(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd,
                            int rows, int dim, float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * dim;
    float s = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) s += ld(x, o + c);
    const float mu = block_sum(s) / dim;
    float v = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float d = ld(x, o + c) - mu;
        v += d * d;
    }
    const float rs = rsqrtf(block_sum(v) / dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        st(y, o + c, (ld(x, o + c) - mu) * rs * ld(w, c) + ld(b, c));
    }
    if (threadIdx.x == 0) { mean[r] = mu; rstd[r] = rs; }
}

template <typename T>
__device__ void layernorm_backward_t(const T* x, const T* w, const float* mean,
                                     const float* rstd, const T* dy, T* dx, int rows, int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * dim;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float g = ld(dy, o + c) * ld(w, c), xh = (ld(x, o + c) - mu) * rs;
        sg += g;
        sgx += g * xh;
    }
    sg = block_sum(sg) / dim;
    sgx = block_sum(sgx) / dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float g = ld(dy, o + c) * ld(w, c), xh = (ld(x, o + c) - mu) * rs;
        st(dx, o + c, rs * (g - sg - xh * sgx));
    }
}

template <typename T>
__device__ void layernorm_dwb_t(const T* x, const float* mean, const float* rstd, const T* dy,
                                T* dw, T* db, int rows, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float sw = 0.0f, sb = 0.0f;
    for (int r = 0; r < rows; ++r) {
        const long long i = (long long)r * dim + c;
        const float d = ld(dy, i);
        sw += d * (ld(x, i) - mean[r]) * rstd[r];
        sb += d;
    }
    st(dw, c, sw);
    st(db, c, sb);
}

#define LAYERNORM(T, S)                                                                        \
    extern "C" __global__ void layernorm_##S(const T* x, const T* w, const T* b, T* y,         \
                                             float* mean, float* rstd, int rows, int dim,      \
                                             float eps) {                                      \
        layernorm_t(x, w, b, y, mean, rstd, rows, dim, eps);                                   \
    }                                                                                          \
    extern "C" __global__ void layernorm_backward_##S(const T* x, const T* w, const float* mean, \
                                                      const float* rstd, const T* dy, T* dx,   \
                                                      int rows, int dim) {                     \
        layernorm_backward_t(x, w, mean, rstd, dy, dx, rows, dim);                             \
    }                                                                                          \
    extern "C" __global__ void layernorm_dwb_##S(const T* x, const float* mean,                \
                                                 const float* rstd, const T* dy, T* dw, T* db, \
                                                 int rows, int dim) {                          \
        layernorm_dwb_t(x, mean, rstd, dy, dw, db, rows, dim);                                 \
    }

LAYERNORM(float, f32)
LAYERNORM(bf16, bf16)
