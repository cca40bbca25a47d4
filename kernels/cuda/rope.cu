// Rotary embeddings on x (B, H, T, D) with HF's rotate-half pairing (i, i + D/2), in place.
// cos, sin: (T, D/2) f32 for the sequence's positions. The backward is the inverse rotation:
// the same kernel with sign = -1.

extern "C" __global__ void rope(bf16* x, const float* cos_t, const float* sin_t, int rows_bh,
                                int t, int d, float sign) {
    const int half = d / 2;
    const long long i = flat_id(); // over rows_bh * t * half pairs
    if (i >= (long long)rows_bh * t * half) return;
    const int c = (int)(i % half);
    const long long row = i / half; // (b, h, t) row
    const int pos = (int)(row % t);
    bf16* p = x + row * d;
    const float co = cos_t[pos * half + c], si = sign * sin_t[pos * half + c];
    const float a = bf16_to_f32(p[c]), b = bf16_to_f32(p[c + half]);
    p[c] = f32_to_bf16(a * co - b * si);
    p[c + half] = f32_to_bf16(b * co + a * si);
}
