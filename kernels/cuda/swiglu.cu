// SwiGLU: y = silu(gate) * up, one thread per element; the backward gives both gradients.

__device__ __forceinline__ float sigmoid_f(float v) {
    return v >= 0.0f ? 1.0f / (1.0f + __expf(-v)) : __expf(v) / (1.0f + __expf(v));
}

extern "C" __global__ void swiglu_forward(const bf16* gate, const bf16* up, bf16* y, long long n) {
    const long long i = flat_id();
    if (i >= n) return;
    const float g = bf16_to_f32(gate[i]);
    y[i] = f32_to_bf16(g * sigmoid_f(g) * bf16_to_f32(up[i]));
}

extern "C" __global__ void swiglu_backward(const bf16* gate, const bf16* up, const bf16* dy,
                                           bf16* dgate, bf16* dup, long long n) {
    const long long i = flat_id();
    if (i >= n) return;
    const float g = bf16_to_f32(gate[i]), u = bf16_to_f32(up[i]), d = bf16_to_f32(dy[i]);
    const float s = sigmoid_f(g);
    dup[i] = f32_to_bf16(d * g * s);
    dgate[i] = f32_to_bf16(d * u * s * (1.0f + g * (1.0f - s)));
}
