// What the two backward passes share (appended to attention.wgsl, before the pass).

@group(0) @binding(4) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> saved_lse: array<f32>;

// The scaled score q_i . k_j, and dO_i . v_j beside it.
struct Dots {
    score: f32,
    dp: f32,
}

// Both dot products in one pass over the rows at `qb` (q, dO) and `kb` (k, v).
fn dots(qb: u32, kb: u32) -> Dots {
    var s = vec4<f32>(0.0);
    var t = vec4<f32>(0.0);
    for (var c = 0u; c < p.d4; c += 4u) {
        s = fma(q[qb + c], k[kb + c], s);
        t = fma(dout[qb + c], v[kb + c], t);
        if (has(c + 1u)) {
            s = fma(q[qb + c + 1u], k[kb + c + 1u], s);
            t = fma(dout[qb + c + 1u], v[kb + c + 1u], t);
        }
        if (has(c + 2u)) {
            s = fma(q[qb + c + 2u], k[kb + c + 2u], s);
            t = fma(dout[qb + c + 2u], v[kb + c + 2u], t);
        }
        if (has(c + 3u)) {
            s = fma(q[qb + c + 3u], k[kb + c + 3u], s);
            t = fma(dout[qb + c + 3u], v[kb + c + 3u], t);
        }
    }
    return Dots(hsum(s) * bitcast<f32>(p.scale), hsum(t));
}
