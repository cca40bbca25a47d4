// Token embeddings. Forward: out (rows, dim) bf16 = table[ids]. Backward without atomics: the
// host groups positions by id (CSR: offsets (ids + 1), positions), and one block per distinct
// id adds its rows in order, so the f32 gradient is deterministic.

extern "C" __global__ void embedding_forward(const bf16* table, const u32* ids, bf16* out,
                                             int rows, int dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* src = table + (long long)ids[r] * dim;
    bf16* dst = out + (long long)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = src[c];
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
