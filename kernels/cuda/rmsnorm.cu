// RMSNorm with the residual add fused in. Forward, one block per row:
//   h = x + res (res may be null), h_out = h (the next residual stream), y = h * rstd * w,
//   rstd = 1 / sqrt(mean(h^2) + eps), saved in f32 for the backward.
// Backward, one block per row: dh = rstd * (g - h * rstd^2 * mean(g * h)) with g = dy * w, plus
// the gradient arriving along the residual stream (dres, may be null). dw is its own kernel:
// one thread per column over all rows in order (deterministic).

extern "C" __global__ void rmsnorm_forward(const bf16* x, const bf16* res, const bf16* w,
                                           bf16* h_out, bf16* y, float* rstd, int rows, int dim,
                                           float eps) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float h = bf16_to_f32(x[o + c]);
        if (res) h += bf16_to_f32(res[o + c]);
        bf16 hb = f32_to_bf16(h);
        if (h_out) h_out[o + c] = hb;
        h = bf16_to_f32(hb); // the stored residual stream is what the backward sees
        ss += h * h;
    }
    const float rs = rsqrtf(block_sum(ss) / dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float h = bf16_to_f32(x[o + c]);
        if (res) h = bf16_to_f32(f32_to_bf16(h + bf16_to_f32(res[o + c])));
        y[o + c] = f32_to_bf16(h * rs * bf16_to_f32(w[c]));
    }
    if (threadIdx.x == 0) rstd[r] = rs;
}

extern "C" __global__ void rmsnorm_backward(const bf16* dy, const bf16* h, const bf16* w,
                                            const float* rstd, const bf16* dres, bf16* dh,
                                            int rows, int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const long long o = (long long)r * dim;
    const float rs = rstd[r];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        dot += bf16_to_f32(dy[o + c]) * bf16_to_f32(w[c]) * bf16_to_f32(h[o + c]);
    }
    const float k = block_sum(dot) / dim * rs * rs;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float g = bf16_to_f32(dy[o + c]) * bf16_to_f32(w[c]);
        float d = rs * (g - bf16_to_f32(h[o + c]) * k);
        if (dres) d += bf16_to_f32(dres[o + c]);
        dh[o + c] = f32_to_bf16(d);
    }
}

// dw[c] = sum over rows of dy * h * rstd, in f32.
extern "C" __global__ void rmsnorm_dw(const bf16* dy, const bf16* h, const float* rstd, float* dw,
                                      int rows, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) {
        const long long o = (long long)r * dim + c;
        s += bf16_to_f32(dy[o]) * bf16_to_f32(h[o]) * rstd[r];
    }
    dw[c] = s;
}
