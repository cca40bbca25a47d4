// Causal attention with grouped-query heads: q (B, Hq, T, D), k = v (B, Hkv, S, D), query head
// h reads K/V head h / (Hq / Hkv) by index (no copies); query i sees keys j <= i + (S - T).
// This file holds what the three passes share; each pass is its own file appended to it
// (attention_fwd, attention_dq, attention_dkv), so every entry point's bindings are contiguous.
// Forward: one invocation per query row with an online softmax, keeping only O and the row's
// log-sum-exp. Backward recomputes P = exp(scale q.k - lse): dq per query row (which also
// stores D_i = dO_i . O_i), then dk and dv per key row over its group's query heads, so every
// output is written by one invocation: no atomics, deterministic. D is at most 256.

struct P {
    batch: u32,
    hq: u32,
    hkv: u32,
    t: u32,
    s: u32,
    d: u32,
    scale: u32, // f32 bits
    pad: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;

fn row_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 64u + lid;
}

// A query row's position: batch b, head h, index i, its K/V head and the offset of its q row.
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
    return ((b * p.hq + h) * p.t + i) * p.d;
}

fn kv_base(b: u32, hk: u32, j: u32) -> u32 {
    return ((b * p.hkv + hk) * p.s + j) * p.d;
}

fn qk(qb: u32, kb: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < p.d; c++) {
        s = fma(q[qb + c], k[kb + c], s);
    }
    return s * bitcast<f32>(p.scale);
}

