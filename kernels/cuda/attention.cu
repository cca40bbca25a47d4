// Causal attention with grouped-query heads by index: q (B, Hq, T, D), k and v (B, Hkv, S, D),
// query head h reads K/V head h / (Hq / Hkv), never a repeated copy; query i sees keys
// j <= i + (S - T). One warp per row: lane l holds elements l, l + 32, ... of the row (any D up
// to 256), dot products are warp sums. flash.cu serves the common head sizes (64 and 128) on
// the tensor cores; this file serves the others, and is the reference to bisect against. The forward keeps O (bf16) and each
// row's log-sum-exp (f32). The backward recomputes P = exp(scale q.k - lse): dq per query row
// (which also stores D_i = dO_i . O_i), then dk and dv per key row over its group's query
// heads, so every output has one writer: no atomics, deterministic.

#define PER_LANE 8 // D / 32 at most

struct Row {
    int b, h, i, hk;
};

__device__ __forceinline__ Row query_row(long long row, int hq, int hkv, int t) {
    Row r;
    r.i = (int)(row % t);
    r.h = (int)((row / t) % hq);
    r.b = (int)(row / ((long long)t * hq));
    r.hk = r.h / (hq / hkv);
    return r;
}

// Loads lanes' elements of a bf16 row of d elements, times `f` (zero past the row's end).
__device__ __forceinline__ void load_row(const bf16* p, int d, int lane, float f, float* out) {
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
        const int i = lane + 32 * e;
        out[e] = i < d ? bf16_to_f32(p[i]) * f : 0.0f;
    }
}

__device__ __forceinline__ float row_dot(const float* a, const bf16* p, int d, int lane) {
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
        const int i = lane + 32 * e;
        if (i < d) s += a[e] * bf16_to_f32(p[i]);
    }
    return warp_sum(s);
}

extern "C" __global__ void attention_forward(const bf16* q, const bf16* k, const bf16* v,
                                             bf16* o, float* lse, int batch, int hq, int hkv,
                                             int t, int s, int d, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (long long)batch * hq * t) return; // whole warps leave together
    const Row r = query_row(row, hq, hkv, t);
    float qv[PER_LANE], acc[PER_LANE];
    load_row(q + row * d, d, lane, scale, qv);
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[e] = 0.0f;
    const long long kv0 = (long long)(r.b * hkv + r.hk) * s * d;
    float m = -3.402823466e38f, l = 0.0f;
    const int last = r.i + (s - t);
    for (int j = 0; j <= last; ++j) {
        const float sc = row_dot(qv, k + kv0 + (long long)j * d, d, lane);
        const float mn = fmaxf(m, sc);
        const float corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
        const bf16* vr = v + kv0 + (long long)j * d;
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) {
            if (lane + 32 * e < d) acc[e] = acc[e] * corr + p * bf16_to_f32(vr[lane + 32 * e]);
        }
        m = mn;
    }
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
        if (lane + 32 * e < d) o[row * d + lane + 32 * e] = f32_to_bf16(acc[e] / l);
    }
    if (lane == 0) lse[row] = m + logf(l);
}

extern "C" __global__ void attention_backward_dq(const bf16* q, const bf16* k, const bf16* v,
                                                 const bf16* o, const float* lse, const bf16* dout,
                                                 bf16* dq, float* delta, int batch, int hq,
                                                 int hkv, int t, int s, int d, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (long long)batch * hq * t) return;
    const Row r = query_row(row, hq, hkv, t);
    float qv[PER_LANE], dov[PER_LANE], acc[PER_LANE];
    load_row(q + row * d, d, lane, scale, qv);
    load_row(dout + row * d, d, lane, 1.0f, dov);
    const float di = row_dot(dov, o + row * d, d, lane);
    if (lane == 0) delta[row] = di;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[e] = 0.0f;
    const long long kv0 = (long long)(r.b * hkv + r.hk) * s * d;
    const float l = lse[row];
    const int last = r.i + (s - t);
    for (int j = 0; j <= last; ++j) {
        const bf16* kr = k + kv0 + (long long)j * d;
        const float p = expf(row_dot(qv, kr, d, lane) - l);
        const float ds = p * (row_dot(dov, v + kv0 + (long long)j * d, d, lane) - di);
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) {
            if (lane + 32 * e < d) acc[e] += ds * bf16_to_f32(kr[lane + 32 * e]);
        }
    }
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
        if (lane + 32 * e < d) dq[row * d + lane + 32 * e] = f32_to_bf16(acc[e] * scale);
    }
}

extern "C" __global__ void attention_backward_dkv(const bf16* q, const bf16* k, const bf16* v,
                                                  const float* lse, const bf16* dout,
                                                  const float* delta, bf16* dk, bf16* dv,
                                                  int batch, int hq, int hkv, int t, int s, int d,
                                                  float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (long long)batch * hkv * s) return;
    const int j = (int)(row % s);
    const int hk = (int)((row / s) % hkv);
    const int b = (int)(row / ((long long)s * hkv));
    const int group = hq / hkv, off = s - t;
    float kv[PER_LANE], vv[PER_LANE], dka[PER_LANE], dva[PER_LANE];
    load_row(k + row * d, d, lane, scale, kv);
    load_row(v + row * d, d, lane, 1.0f, vv);
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
        dka[e] = 0.0f;
        dva[e] = 0.0f;
    }
    const int first = j > off ? j - off : 0; // query i sees key j when j <= i + off
    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        for (int i = first; i < t; ++i) {
            const long long qrow = ((long long)(b * hq + h)) * t + i;
            const bf16* qr = q + qrow * d;
            const bf16* dor = dout + qrow * d;
            const float p = expf(row_dot(kv, qr, d, lane) - lse[qrow]);
            const float ds = p * (row_dot(vv, dor, d, lane) - delta[qrow]);
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e) {
                if (lane + 32 * e < d) {
                    dva[e] += p * bf16_to_f32(dor[lane + 32 * e]);
                    dka[e] += ds * bf16_to_f32(qr[lane + 32 * e]);
                }
            }
        }
    }
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
        if (lane + 32 * e < d) {
            dk[row * d + lane + 32 * e] = f32_to_bf16(dka[e] * scale);
            dv[row * d + lane + 32 * e] = f32_to_bf16(dva[e]);
        }
    }
}
