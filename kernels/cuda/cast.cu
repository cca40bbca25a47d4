// Element-type casts between f32 and the 16-bit floats, one thread per element.

extern "C" __global__ void f32_to_bf16_kernel(const float* x, bf16* y, long long n) {
    long long i = flat_id();
    if (i < n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void bf16_to_f32_kernel(const bf16* x, float* y, long long n) {
    long long i = flat_id();
    if (i < n) y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void f32_to_f16_kernel(const float* x, f16* y, long long n) {
    long long i = flat_id();
    if (i < n) y[i] = f32_to_f16(x[i]);
}

extern "C" __global__ void f16_to_f32_kernel(const f16* x, float* y, long long n) {
    long long i = flat_id();
    if (i < n) y[i] = f16_to_f32(x[i]);
}
