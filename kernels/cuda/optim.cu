// The optimizer: fused AdamW on f32 master weights (decay, moments, bias-corrected step; the
// gradient scaled by the clipping factor on the way in), writing the bf16 working copy in the
// same pass; and per-block partial sums of squares for the global gradient norm (the host adds
// the partials in f64 and folds clipping into grad_scale).

extern "C" __global__ void adamw(float* master, const float* grad, float* m, float* v,
                                 bf16* weight, long long n, float lr, float beta1, float beta2,
                                 float one_minus_beta1, float one_minus_beta2, float eps,
                                 float weight_decay, float bias1, float bias2, float grad_scale) {
    const long long i = flat_id();
    if (i >= n) return;
    const float g = grad[i] * grad_scale;
    float w = master[i];
    w -= lr * weight_decay * w;
    const float mi = beta1 * m[i] + one_minus_beta1 * g;
    const float vi = beta2 * v[i] + one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    w -= lr * (mi / bias1) / (sqrtf(vi / bias2) + eps);
    master[i] = w;
    if (weight) weight[i] = f32_to_bf16(w);
}

// partial[base + blockIdx.x] = sum of x^2 over this block's grid-stride share of n values.
extern "C" __global__ void sum_squares(const float* x, long long n, float* partial, int base) {
    float s = 0.0f;
    for (long long i = flat_id(); i < n; i += (long long)gridDim.x * blockDim.x) s += x[i] * x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) partial[base + blockIdx.x] = s;
}
