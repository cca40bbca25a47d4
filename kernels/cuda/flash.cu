// Causal GQA attention on the tensor cores, tiled flash-style: q (B, Hq, T, D), k and v
// (B, Hkv, S, D) bf16, query head h reading K/V head h / (Hq / Hkv) by index, query i seeing keys
// j <= i + (S - T). Products are mma.sync m16n8k16 (bf16 operands, f32 accumulators); softmax
// statistics are f32. Instantiated for D = 64 and 128; other head sizes use attention.cu.
//
// Forward: a block of 4 warps takes 64 query rows of one (b, h), 16 a warp, Q in registers; K
// and V tiles of 64 keys pass through shared memory; each warp keeps its rows' running max and
// sum (online softmax) and its O in registers, and writes O (bf16) and each row's log-sum-exp
// of the scaled scores (f32). Tiles wholly past a block's causal limit are never loaded.
// Backward (recompute, no atomics, so every output has one writer and runs are deterministic):
// attention_delta gives D_i = dO_i . O_i; flash_dq takes 64 query rows a block and walks key
// tiles (dQ = dS K); flash_dkv takes 64 keys a block and walks the group's query heads and
// their query tiles (dV = P^T dO, dK = dS^T Q), with P = exp(scale q.k - lse), dS = P (dP - D).
//
// Fragment layouts of m16n8k16 (g = lane / 4, c = lane % 4; a register holds two bf16, the
// lower index in the low half): A (16 x 16, row-major) regs {A[g][2c..], A[g+8][2c..],
// A[g][2c+8..], A[g+8][2c+8..]}; B (16 x 8, k by n) regs {B[2c..2c+1][g], B[2c+8..2c+9][g]};
// C (16 x 8) {C[g][2c], C[g][2c+1], C[g+8][2c], C[g+8][2c+1]}. A C tile of scores over 16 keys
// (two n-blocks) is an A fragment over those keys as it stands, which is how P and dS feed the
// next product without passing through shared memory.

#define FA_WARPS 4
#define FA_ROWS 64 // query rows (forward, dQ) or keys (dK/dV) a block: 16 a warp
#define FA_KEYS 64 // keys a tile in the forward
#define FA_DQ_KEYS 32 // keys a tile in the dQ pass
#define FA_DKV_ROWS 32 // query rows a tile in the dK/dV pass
#define NEG_INF (-__int_as_float(0x7f800000))
#define FULL 0xffffffffu

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// The A fragment of one 16-wide k-step from two C tiles side by side (`lo` its first 8
// columns, `hi` the next 8), rounded to bf16: how P and dS feed the next product.
__device__ __forceinline__ void c_to_a(u32* a, const float* lo, const float* hi) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// c += a . b on the tensor cores.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two consecutive bf16 of a row as one register (the pointer is 4-byte aligned).
__device__ __forceinline__ u32 ld2(const bf16* p) { return *(const u32*)p; }

// The A fragments of 16 rows of a (rows, D) bf16 matrix from row r0; rows at or past `n` are
// zero.
template <int D>
__device__ __forceinline__ void load_a(u32 (*a)[4], const bf16* m, int r0, int n) {
    const int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    const bf16* p0 = m + (long long)(r0 + g) * D + 2 * c;
    const bf16* p1 = p0 + 8LL * D;
    const bool in0 = r0 + g < n, in1 = r0 + g + 8 < n;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        a[kk][0] = in0 ? ld2(p0 + kk * 16) : 0u;
        a[kk][1] = in1 ? ld2(p1 + kk * 16) : 0u;
        a[kk][2] = in0 ? ld2(p0 + kk * 16 + 8) : 0u;
        a[kk][3] = in1 ? ld2(p1 + kk * 16 + 8) : 0u;
    }
}

// B fragment for one k-step of a product against the transpose of a shared tile: B[k][n] =
// tile[n0 + n][k0 + k], two consecutive elements of one tile row per register.
__device__ __forceinline__ void b_rows(u32* b, const bf16* tile, int ld, int n0, int k0) {
    const int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    const bf16* p = tile + (n0 + g) * ld + k0 + 2 * c;
    b[0] = ld2(p);
    b[1] = ld2(p + 8);
}

// B fragment for one k-step of a product against a shared tile as it stands: B[k][n] =
// tile[k0 + k][n0 + n], two elements of one column per register.
__device__ __forceinline__ void b_cols(u32* b, const bf16* tile, int ld, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    const bf16* p = tile + (k0 + 2 * c) * ld + n0 + g;
    b[0] = (u32)p[0] | ((u32)p[ld] << 16);
    b[1] = (u32)p[8 * ld] | ((u32)p[9 * ld] << 16);
}

// c = A . tile^T: the 16 x (NB * 8) products of this warp's 16 rows (A fragments over D) with
// NB * 8 rows of a shared tile of D columns (scores against keys, or against queries).
template <int D, int NB>
__device__ __forceinline__ void tile_products(float (*c)[4], const u32 (*a)[4], const bf16* tile) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 bf[2];
            b_rows(bf, tile, D + 8, nb * 8, kk * 16);
            mma_bf16(c[nb], a[kk], bf);
        }
    }
}

// acc += C . tile: C is KS * 16 columns of C tiles (probabilities or dS, rounded to bf16 as A
// fragments), the tile KS * 16 rows of D columns (V, K, dO or Q).
template <int D, int KS>
__device__ __forceinline__ void accumulate_tile(float (*acc)[4], const float (*c)[4],
                                                const bf16* tile) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        u32 a[4];
        c_to_a(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
            u32 bf[2];
            b_cols(bf, tile, D + 8, kk * 16, nb * 8);
            mma_bf16(acc[nb], a, bf);
        }
    }
}

// Copies rows r0 .. r0 + rows of a (n, D) bf16 matrix into a shared tile of stride D + 8, 16
// bytes a thread at a time; rows at or past n are zero.
template <int D>
__device__ __forceinline__ void tile_in(bf16* tile, const bf16* m, int r0, int rows, int n) {
    constexpr int CHUNKS = D / 8;
    for (int i = threadIdx.x; i < rows * CHUNKS; i += blockDim.x) {
        const int r = i / CHUNKS, col = (i % CHUNKS) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < n) v = *(const uint4*)(m + (long long)(r0 + r) * D + col);
        *(uint4*)(tile + r * (D + 8) + col) = v;
    }
}

// The max (or sum) of a row's values over the four lanes that hold it.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(FULL, v, 1);
    return v + __shfl_xor_sync(FULL, v, 2);
}

template <int D>
__device__ void flash_forward_t(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                                int hq, int hkv, int t, int s, float scale) {
    constexpr int LD = D + 8, NB = D / 8;
    __shared__ __align__(16) bf16 ks[FA_KEYS * LD];
    __shared__ __align__(16) bf16 vs[FA_KEYS * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int bh = blockIdx.y, b = bh / hq, h = bh % hq, hk = h / (hq / hkv), off = s - t;
    const int block0 = blockIdx.x * FA_ROWS, q0 = block0 + warp * 16;
    const int r0 = q0 + g, r1 = r0 + 8;
    const bf16* kb = k + (long long)(b * hkv + hk) * s * D;
    const bf16* vb = v + (long long)(b * hkv + hk) * s * D;
    u32 qa[D / 16][4];
    load_a<D>(qa, q + (long long)bh * t * D, q0, t);
    float acc[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f; // l: this lane's share of the sum
    const bool active = q0 < t;
    // Keys up to the block's last row's limit (at most S).
    const int kend = min(block0 + FA_ROWS, t) - 1 + off + 1;
    for (int k0 = 0; k0 < kend; k0 += FA_KEYS) {
        __syncthreads(); // every warp is done with the previous tiles
        tile_in<D>(ks, kb, k0, FA_KEYS, s);
        tile_in<D>(vs, vb, k0, FA_KEYS, s);
        __syncthreads();
        if (!active || k0 > q0 + 15 + off) continue; // wholly masked for this warp's rows
        float sc[FA_KEYS / 8][4];
        tile_products<D, FA_KEYS / 8>(sc, qa, ks);
        float x0 = NEG_INF, x1 = NEG_INF;
#pragma unroll
        for (int nb = 0; nb < FA_KEYS / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = k0 + nb * 8 + 2 * c + e;
                // A key past a row's limit is masked; keys past S are past every row's limit.
                sc[nb][e] = key > r0 + off ? NEG_INF : sc[nb][e] * scale;
                sc[nb][2 + e] = key > r1 + off ? NEG_INF : sc[nb][2 + e] * scale;
                x0 = fmaxf(x0, sc[nb][e]);
                x1 = fmaxf(x1, sc[nb][2 + e]);
            }
        }
        // A row's first tile holds its key 0, so its max is finite from the first tile on
        // (rows past T are never written).
        const float n0 = fmaxf(m0, quad_max(x0)), n1 = fmaxf(m1, quad_max(x1));
        const float c0 = expf(m0 - n0), c1 = expf(m1 - n1);
        m0 = n0;
        m1 = n1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            acc[nb][0] *= c0;
            acc[nb][1] *= c0;
            acc[nb][2] *= c1;
            acc[nb][3] *= c1;
        }
#pragma unroll
        for (int nb = 0; nb < FA_KEYS / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                sc[nb][e] = expf(sc[nb][e] - n0);
                sc[nb][2 + e] = expf(sc[nb][2 + e] - n1);
                l0 += sc[nb][e];
                l1 += sc[nb][2 + e];
            }
        }
        accumulate_tile<D, FA_KEYS / 16>(acc, sc, vs); // O += P V
    }
    if (!active) return;
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const long long row0 = (long long)bh * t + r0, row1 = row0 + 8;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const int col = nb * 8 + 2 * c;
        if (r0 < t) *(u32*)(o + row0 * D + col) = pack_bf16(acc[nb][0] / l0, acc[nb][1] / l0);
        if (r1 < t) *(u32*)(o + row1 * D + col) = pack_bf16(acc[nb][2] / l1, acc[nb][3] / l1);
    }
    if (c == 0) {
        if (r0 < t) lse[row0] = m0 + logf(l0);
        if (r1 < t) lse[row1] = m1 + logf(l1);
    }
}

template <int D>
__device__ void flash_dq_t(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                           const float* lse, const float* delta, bf16* dq, int hq, int hkv, int t,
                           int s, float scale) {
    constexpr int LD = D + 8, NB = D / 8, KB = FA_DQ_KEYS / 8;
    __shared__ __align__(16) bf16 ks[FA_DQ_KEYS * LD];
    __shared__ __align__(16) bf16 vs[FA_DQ_KEYS * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int bh = blockIdx.y, b = bh / hq, h = bh % hq, hk = h / (hq / hkv), off = s - t;
    const int block0 = blockIdx.x * FA_ROWS, q0 = block0 + warp * 16;
    const int r0 = q0 + g, r1 = r0 + 8;
    const bf16* kb = k + (long long)(b * hkv + hk) * s * D;
    const bf16* vb = v + (long long)(b * hkv + hk) * s * D;
    u32 qa[D / 16][4], da[D / 16][4];
    load_a<D>(qa, q + (long long)bh * t * D, q0, t);
    load_a<D>(da, dout + (long long)bh * t * D, q0, t);
    const long long row0 = (long long)bh * t + r0, row1 = row0 + 8;
    const float lse0 = r0 < t ? lse[row0] : 0.0f, lse1 = r1 < t ? lse[row1] : 0.0f;
    const float d0 = r0 < t ? delta[row0] : 0.0f, d1 = r1 < t ? delta[row1] : 0.0f;
    float acc[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;
    const bool active = q0 < t;
    const int kend = min(block0 + FA_ROWS, t) - 1 + off + 1;
    for (int k0 = 0; k0 < kend; k0 += FA_DQ_KEYS) {
        __syncthreads();
        tile_in<D>(ks, kb, k0, FA_DQ_KEYS, s);
        tile_in<D>(vs, vb, k0, FA_DQ_KEYS, s);
        __syncthreads();
        if (!active || k0 > q0 + 15 + off) continue;
        float sc[KB][4], dp[KB][4];
        tile_products<D, KB>(sc, qa, ks); // S = Q K^T
        tile_products<D, KB>(dp, da, vs); // dP = dO V^T
        // dS = P (dP - D), P = exp(scale s - lse), zero past each row's limit.
#pragma unroll
        for (int nb = 0; nb < KB; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = k0 + nb * 8 + 2 * c + e;
                const float p0 = key > r0 + off ? 0.0f : expf(sc[nb][e] * scale - lse0);
                const float p1 = key > r1 + off ? 0.0f : expf(sc[nb][2 + e] * scale - lse1);
                sc[nb][e] = p0 * (dp[nb][e] - d0);
                sc[nb][2 + e] = p1 * (dp[nb][2 + e] - d1);
            }
        }
        accumulate_tile<D, FA_DQ_KEYS / 16>(acc, sc, ks); // dQ += dS K
    }
    if (!active) return;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const int col = nb * 8 + 2 * c;
        if (r0 < t)
            *(u32*)(dq + row0 * D + col) = pack_bf16(acc[nb][0] * scale, acc[nb][1] * scale);
        if (r1 < t)
            *(u32*)(dq + row1 * D + col) = pack_bf16(acc[nb][2] * scale, acc[nb][3] * scale);
    }
}

template <int D>
__device__ void flash_dkv_t(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,
                            const float* lse, const float* delta, bf16* dk, bf16* dv, int hq,
                            int hkv, int t, int s, float scale) {
    constexpr int LD = D + 8, NB = D / 8, QB = FA_DKV_ROWS / 8;
    __shared__ __align__(16) bf16 qs[FA_DKV_ROWS * LD];
    __shared__ __align__(16) bf16 dos[FA_DKV_ROWS * LD];
    __shared__ float lses[FA_DKV_ROWS], dels[FA_DKV_ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int bk = blockIdx.y, b = bk / hkv, hk = bk % hkv, group = hq / hkv, off = s - t;
    const int block0 = blockIdx.x * FA_ROWS, j0 = block0 + warp * 16;
    const int kr0 = j0 + g, kr1 = kr0 + 8; // this lane's two keys
    const bf16* kb = k + (long long)bk * s * D;
    const bf16* vb = v + (long long)bk * s * D;
    // K as the A operand of S^T = K Q^T stays in registers; V's fragments (for dP^T = V dO^T)
    // are read again per tile, from cache, to leave registers for the two accumulators.
    u32 ka[D / 16][4];
    load_a<D>(ka, kb, j0, s);
    float dka[NB][4], dva[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        dka[nb][0] = dka[nb][1] = dka[nb][2] = dka[nb][3] = 0.0f;
        dva[nb][0] = dva[nb][1] = dva[nb][2] = dva[nb][3] = 0.0f;
    }
    const bool active = j0 < s;
    // The first query that sees the block's first key, down to a tile boundary.
    const int first = max(block0 - off, 0) / FA_DKV_ROWS * FA_DKV_ROWS;
    for (int gh = 0; gh < group; ++gh) {
        const int bh = b * hq + hk * group + gh;
        const bf16* qb = q + (long long)bh * t * D;
        const bf16* db = dout + (long long)bh * t * D;
        for (int i0 = first; i0 < t; i0 += FA_DKV_ROWS) {
            __syncthreads();
            tile_in<D>(qs, qb, i0, FA_DKV_ROWS, t);
            tile_in<D>(dos, db, i0, FA_DKV_ROWS, t);
            if (threadIdx.x < FA_DKV_ROWS) {
                const int i = i0 + threadIdx.x;
                lses[threadIdx.x] = i < t ? lse[(long long)bh * t + i] : 0.0f;
                dels[threadIdx.x] = i < t ? delta[(long long)bh * t + i] : 0.0f;
            }
            __syncthreads();
            // Skip when the tile's last query sees none of this warp's keys.
            if (!active || i0 + FA_DKV_ROWS - 1 + off < j0) continue;
            u32 va[D / 16][4];
            load_a<D>(va, vb, j0, s);
            float st[QB][4], dpt[QB][4]; // S^T and dP^T: 16 keys by the tile's queries
            tile_products<D, QB>(st, ka, qs);   // S^T = K Q^T
            tile_products<D, QB>(dpt, va, dos); // dP^T = V dO^T
            // P^T and dS^T = P^T (dP^T - D), zero where the key is past the query's limit or
            // the query is past T.
#pragma unroll
            for (int nb = 0; nb < QB; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = nb * 8 + 2 * c + e, i = i0 + col;
                    const float l = lses[col], dd = dels[col];
                    const float p0 = (i >= t || kr0 > i + off) ? 0.0f : expf(st[nb][e] * scale - l);
                    const float p1 =
                        (i >= t || kr1 > i + off) ? 0.0f : expf(st[nb][2 + e] * scale - l);
                    st[nb][e] = p0;
                    st[nb][2 + e] = p1;
                    dpt[nb][e] = p0 * (dpt[nb][e] - dd);
                    dpt[nb][2 + e] = p1 * (dpt[nb][2 + e] - dd);
                }
            }
            accumulate_tile<D, FA_DKV_ROWS / 16>(dva, st, dos); // dV += P^T dO
            accumulate_tile<D, FA_DKV_ROWS / 16>(dka, dpt, qs); // dK += dS^T Q
        }
    }
    if (!active) return;
    const long long row0 = (long long)bk * s + kr0, row1 = row0 + 8;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const int col = nb * 8 + 2 * c;
        if (kr0 < s) {
            *(u32*)(dk + row0 * D + col) = pack_bf16(dka[nb][0] * scale, dka[nb][1] * scale);
            *(u32*)(dv + row0 * D + col) = pack_bf16(dva[nb][0], dva[nb][1]);
        }
        if (kr1 < s) {
            *(u32*)(dk + row1 * D + col) = pack_bf16(dka[nb][2] * scale, dka[nb][3] * scale);
            *(u32*)(dv + row1 * D + col) = pack_bf16(dva[nb][2], dva[nb][3]);
        }
    }
}

// D_i = dO_i . O_i for each of `rows` rows of d elements: one warp a row.
extern "C" __global__ void attention_delta(const bf16* o, const bf16* dout, float* delta,
                                           long long rows, int d) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int e = lane; e < d; e += 32) s += bf16_to_f32(o[row * d + e]) * bf16_to_f32(dout[row * d + e]);
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

#define FLASH(D)                                                                               \
    extern "C" __global__ void __launch_bounds__(128) flash_forward_d##D(                      \
        const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int hq, int hkv,     \
        int t, int s, float scale) {                                                           \
        flash_forward_t<D>(q, k, v, o, lse, hq, hkv, t, s, scale);                             \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, 1) flash_dq_d##D(                        \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,       \
        const float* delta, bf16* dq, int hq, int hkv, int t, int s, float scale) {            \
        flash_dq_t<D>(q, k, v, dout, lse, delta, dq, hq, hkv, t, s, scale);                    \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) flash_dkv_d##D(                          \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,       \
        const float* delta, bf16* dk, bf16* dv, int hq, int hkv, int t, int s, float scale) {  \
        flash_dkv_t<D>(q, k, v, dout, lse, delta, dk, dv, hq, hkv, t, s, scale);               \
    }

FLASH(64)
FLASH(128)
