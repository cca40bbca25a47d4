// The fused LM-head loss around cuBLAS: logits are formed a chunk of rows at a time (f32, from
// bf16 operands) and never for all rows. Pass 1 (head_lse): per row the log-sum-exp and the
// target logit, so l = lse - z[y] and c = exp(-l). Then, per sample, the group confidence and
// s_b (sample_weights) and each token's coefficient a_t (token_coef). Pass 2 recomputes the
// chunk: head_grad turns it into G = a (softmax - onehot) for dW = G^T X, or a * softmax alone
// for dX = G W, whose target term -a W[y] head_target_term adds in f32.

// One block per row of the chunk; rows of all chunks index lse / tl from row0.
extern "C" __global__ void head_lse(const float* z, const u32* targets, float* lse, float* tl,
                                    int rows, int vocab, int row0) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* zr = z + (long long)r * vocab;
    float m = -3.402823466e38f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, zr[j]);
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(zr[j] - m);
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        lse[row0 + r] = m + log1pf(sum - 1.0f); // sum >= 1: the max term is exp(0)
        tl[row0 + r] = zr[targets[row0 + r]];
    }
}

// g[r, j] = coef[r] * (softmax(z_r)[j] - (with_target && j == y_r)), as bf16 for the GEMM.
extern "C" __global__ void head_grad(const float* z, bf16* g, const u32* targets,
                                     const float* lse, const float* coef, int rows, int vocab,
                                     int row0, int with_target) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* zr = z + (long long)r * vocab;
    bf16* gr = g + (long long)r * vocab;
    const float l = lse[row0 + r], a = coef[row0 + r];
    const u32 y = targets[row0 + r];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = expf(zr[j] - l);
        if (with_target && (u32)j == y) p -= 1.0f;
        gr[j] = f32_to_bf16(a * p);
    }
}

// dx[r, :] -= coef[r] * w[y_r, :] in f32: the target term of dX kept out of the bf16 GEMM.
extern "C" __global__ void head_target_term(float* dx, const bf16* w, const u32* targets,
                                            const float* coef, int rows, int hidden, int row0) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float a = coef[row0 + r];
    const bf16* wr = w + (long long)targets[row0 + r] * hidden;
    float* d = dx + (long long)r * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) d[c] -= a * bf16_to_f32(wr[c]);
}

// Per sample b (its valid tokens are logp[offsets[b]..offsets[b + 1]], log c_t compacted): the
// lowest mean confidence over windows of g tokens (stride 1; one window when 0 < n < g),
// arithmetic (mean c) or geometric (exp of mean log c), and s_b = clamp(1 - p_conf^gamma, 0, 1).
// A sample without valid tokens gets p_conf 1 and s_b 1, as the host's variants give it (its
// loss is an exact zero either way).
// prefix: scratch of (tokens + batch) doubles. One block per sample.
extern "C" __global__ void sample_weights(const float* logp, const u32* offsets, double* prefix,
                                          float* p_conf, float* s_b, int batch, int g,
                                          int geometric, float gamma) {
    const int b = blockIdx.x;
    if (b >= batch) return;
    const u32 start = offsets[b];
    const int n = (int)(offsets[b + 1] - start);
    double* pre = prefix + start + b; // n + 1 entries
    if (threadIdx.x == 0) {
        double acc = 0.0;
        pre[0] = 0.0;
        for (int t = 0; t < n; ++t) {
            const float lp = logp[start + t];
            acc += geometric ? (double)lp : exp((double)lp);
            pre[t + 1] = acc;
        }
    }
    __syncthreads();
    const int w = n < g ? n : g;
    const int windows = n - w + 1;
    float lowest = 3.402823466e38f;
    for (int i = threadIdx.x; i < windows && w > 0; i += blockDim.x) {
        const double mean = (pre[i + w] - pre[i]) / w;
        const float c = geometric ? (float)exp(mean) : (float)mean;
        lowest = fminf(lowest, c);
    }
    lowest = -block_max(-lowest);
    if (threadIdx.x == 0) {
        const float pc = n > 0 ? lowest : 1.0f;
        p_conf[b] = pc;
        s_b[b] = n > 0 ? fminf(fmaxf(1.0f - powf(pc, gamma), 0.0f), 1.0f) : 1.0f;
    }
}

// a_t = s_b * w_t / (denom * (n_b + 1e-8)) for each valid token t of sample sample_of[t]; w_t
// is 1 (token_weight 0) or max(c_t, floor) (token_weight 1, DFT and BFT); denom is the number
// of samples the loss is averaged over (the optimizer step's, which may hold several batches).
extern "C" __global__ void token_coef(const float* logp, const u32* sample_of, const u32* offsets,
                                      const float* s_b, float* coef, int tokens, float denom,
                                      int token_weight, float floor_w) {
    const long long t = flat_id();
    if (t >= tokens) return;
    const u32 b = sample_of[t];
    const float n = (float)(offsets[b + 1] - offsets[b]);
    const float w = token_weight ? fmaxf(expf(logp[t]), floor_w) : 1.0f;
    coef[t] = s_b[b] * w / (denom * (n + 1e-8f));
}

// Per sample b: sums[3b] = sum of log c_t, sums[3b + 1] = sum of w_t log c_t, sums[3b + 2] =
// sum of w_t (w_t as in token_coef), over its valid tokens: what the per-sample statistics
// (cross-entropy, the sample's loss term, the mean token weight) are made of. One block per
// sample, f32 block sums.
extern "C" __global__ void sample_sums(const float* logp, const u32* offsets, float* sums,
                                       int batch, int token_weight, float floor_w) {
    const int b = blockIdx.x;
    if (b >= batch) return;
    float lp_sum = 0.0f, wlp_sum = 0.0f, w_sum = 0.0f;
    for (u32 t = offsets[b] + threadIdx.x; t < offsets[b + 1]; t += blockDim.x) {
        const float lp = logp[t];
        const float w = token_weight ? fmaxf(expf(lp), floor_w) : 1.0f;
        lp_sum += lp;
        wlp_sum += w * lp;
        w_sum += w;
    }
    lp_sum = block_sum(lp_sum);
    wlp_sum = block_sum(wlp_sum);
    w_sum = block_sum(w_sum);
    if (threadIdx.x == 0) {
        sums[3 * b] = lp_sum;
        sums[3 * b + 1] = wlp_sum;
        sums[3 * b + 2] = w_sum;
    }
}
