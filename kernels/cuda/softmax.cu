// Softmax and log-softmax over the last axis, one block per row, statistics in f32:
//   y = exp(x - max - log(sum exp(x - max)))  (log: y = x - max - log(sum ...)).
// Backward, one block per row: softmax dx = y * (dy - sum(dy * y)); log-softmax
// dx = dy - exp(y) * sum(dy).

// log(sum(exp(x))) of one row of `cols` values, by the whole block (every thread calls it).
template <typename T>
__device__ float row_lse(const T* x, int cols) {
    float m = -3.402823466e38f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, ld(x, c));
    m = block_max(m);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += expf(ld(x, c) - m);
    return m + logf(block_sum(s));
}

template <typename T>
__device__ void softmax_t(const T* x, T* y, int rows, int cols, int log_out) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * cols;
    const float lse = row_lse(x + o, cols);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = ld(x, o + c) - lse;
        st(y, o + c, log_out ? v : expf(v));
    }
}

template <typename T>
__device__ void softmax_backward_t(const T* y, const T* dy, T* dx, int rows, int cols,
                                   int log_out) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        s += log_out ? ld(dy, o + c) : ld(dy, o + c) * ld(y, o + c);
    }
    s = block_sum(s);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float yv = ld(y, o + c), d = ld(dy, o + c);
        st(dx, o + c, log_out ? d - expf(yv) * s : yv * (d - s));
    }
}

// Negative log-likelihood of each row's target from logits, one block per row: the loss
// lse - z[target] and the direction softmax - onehot, which the backward scales per row.
template <typename T>
__device__ void nll_t(const T* z, const u32* targets, T* loss, T* dir, int rows, int vocab) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * vocab;
    const float lse = row_lse(z + o, vocab);
    const int y = (int)targets[r];
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        st(dir, o + c, expf(ld(z, o + c) - lse) - (c == y ? 1.0f : 0.0f));
    }
    if (threadIdx.x == 0) st(loss, r, lse - ld(z, o + y));
}

#define SOFTMAX(T, S)                                                                          \
    extern "C" __global__ void softmax_##S(const T* x, T* y, int rows, int cols, int log_out) { \
        softmax_t(x, y, rows, cols, log_out);                                                  \
    }                                                                                          \
    extern "C" __global__ void softmax_backward_##S(const T* y, const T* dy, T* dx, int rows,  \
                                                    int cols, int log_out) {                   \
        softmax_backward_t(y, dy, dx, rows, cols, log_out);                                    \
    }                                                                                          \
    extern "C" __global__ void nll_##S(const T* z, const u32* targets, T* loss, T* dir,        \
                                       int rows, int vocab) {                                  \
        nll_t(z, targets, loss, dir, rows, vocab);                                             \
    }

SOFTMAX(float, f32)
SOFTMAX(bf16, bf16)
