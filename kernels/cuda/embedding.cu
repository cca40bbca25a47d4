// Token embeddings. Forward: out (rows, dim) = table[ids], as stored. Backward without atomics: the
// host groups positions by id (CSR: offsets (ids + 1), positions), and one block per distinct
// id adds its rows in order, so the f32 gradient is deterministic.

// The forward is a copy, so it goes by element width: 4 bytes (f32) or 2 (bf16, f16).
template <typename E>
__device__ void embedding_forward_t(const E* table, const u32* ids, E* out, int rows, int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const E* src = table + (long long)ids[r] * dim;
    E* dst = out + (long long)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void embedding_forward_b4(const u32* table, const u32* ids, u32* out,
                                                int rows, int dim) {
    embedding_forward_t(table, ids, out, rows, dim);
}

extern "C" __global__ void embedding_forward_b2(const bf16* table, const u32* ids, bf16* out,
                                                int rows, int dim) {
    embedding_forward_t(table, ids, out, rows, dim);
}

// dtable[unique_ids[k]] = sum of dout[p] for p in positions[offsets[k]..offsets[k + 1]].
extern "C" __global__ void embedding_backward(const float* dout, const u32* unique_ids,
                                              const u32* offsets, const u32* positions,
                                              float* dtable, int groups, int dim) {
    const int k = blockIdx.x;
    if (k >= groups) return;
    float* dst = dtable + (long long)unique_ids[k] * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float s = 0.0f;
        for (u32 j = offsets[k]; j < offsets[k + 1]; ++j) s += dout[(long long)positions[j] * dim + c];
        dst[c] += s;
    }
}
