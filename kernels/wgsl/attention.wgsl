// Causal attention with grouped-query heads: q (B, Hq, T, D), k = v (B, Hkv, S, D), query head
// h reads K/V head h / (Hq / Hkv) by index (no copies); query i sees keys j <= i + (S - T).
// This file holds what the three passes share; each pass is its own file appended to it
// (attention_fwd; attention_bwd then attention_dq or attention_dkv), so every entry point's
// bindings are contiguous.
// Forward: one invocation per query row with an online softmax, keeping only O and the row's
// log-sum-exp. Backward recomputes P = exp(scale q.k - lse): dq per query row (which also
// stores D_i = dO_i . O_i), then dk and dv per key row over its group's query heads, so every
// output is written by one invocation: no atomics, deterministic.
// Rows are read as vec4 (D is a multiple of 4, at most 256) and the loops over a row take four
// vec4 per iteration: besides wide loads, this keeps the loop back-edges per invocation low, and
// Mesa's software Vulkan device stops an invocation after 65,535 back-edges in all (with one
// vec4 per iteration, rows past about 500 keys at D = 64 came out wrong there).

struct P {
    batch: u32,
    hq: u32,
    hkv: u32,
    t: u32,
    s: u32,
    d4: u32,    // D / 4: a row's vec4 count
    scale: u32, // f32 bits
    pad: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;

fn row_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 64u + lid;
}

// A query row's position: batch b, head h, index i, its K/V head and the offset of its q row
// (offsets count vec4).
struct QueryRow {
    b: u32,
    h: u32,
    i: u32,
    hk: u32,
    qb: u32,
}

fn query_row(row: u32) -> QueryRow {
    let i = row % p.t;
    let h = (row / p.t) % p.hq;
    let b = row / (p.t * p.hq);
    return QueryRow(b, h, i, h / (p.hq / p.hkv), q_base(b, h, i));
}

fn q_base(b: u32, h: u32, i: u32) -> u32 {
    return ((b * p.hq + h) * p.t + i) * p.d4;
}

fn kv_base(b: u32, hk: u32, j: u32) -> u32 {
    return ((b * p.hkv + hk) * p.s + j) * p.d4;
}

fn hsum(x: vec4<f32>) -> f32 {
    return (x.x + x.y) + (x.z + x.w);
}

// Whether vec4 `c` of a row exists (the last iteration of a 4-wide loop may be partial).
fn has(c: u32) -> bool {
    return c < p.d4;
}

fn qk(qb: u32, kb: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var c = 0u; c < p.d4; c += 4u) {
        s = fma(q[qb + c], k[kb + c], s);
        if (has(c + 1u)) { s = fma(q[qb + c + 1u], k[kb + c + 1u], s); }
        if (has(c + 2u)) { s = fma(q[qb + c + 2u], k[kb + c + 2u], s); }
        if (has(c + 3u)) { s = fma(q[qb + c + 3u], k[kb + c + 3u], s); }
    }
    return hsum(s) * bitcast<f32>(p.scale);
}

