// Attention backward, dk and dv per key row over the query heads of its group, reading D_i
// from the dq pass (appended to attention_bwd.wgsl).

@group(0) @binding(6) var<storage, read> delta: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk_out: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dv_out: array<vec4<f32>>;

@compute @workgroup_size(64)
fn attn_bwd_dkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = row_id(wid, nwg, lid);
    if (row >= p.batch * p.hkv * p.s) { return; }
    let j = row % p.s;
    let hk = (row / p.s) % p.hkv;
    let b = row / (p.s * p.hkv);
    let kb = kv_base(b, hk, j);
    let group = p.hq / p.hkv;
    let off = p.s - p.t;
    var dk: array<vec4<f32>, 64>;
    var dv: array<vec4<f32>, 64>;
    // Query i sees key j when j <= i + off.
    var first = 0u;
    if (j > off) {
        first = j - off;
    }
    for (var g = 0u; g < group; g++) {
        let h = hk * group + g;
        for (var i = first; i < p.t; i++) {
            let qb = q_base(b, h, i);
            let qrow = (b * p.hq + h) * p.t + i;
            let dt = dots(qb, kb);
            let pij = exp(dt.score - saved_lse[qrow]);
            let pv = vec4(pij);
            let ds = vec4(pij * (dt.dp - delta[qrow]));
            for (var c = 0u; c < p.d4; c += 4u) {
                dv[c] = fma(pv, dout[qb + c], dv[c]);
                dk[c] = fma(ds, q[qb + c], dk[c]);
                if (has(c + 1u)) {
                    dv[c + 1u] = fma(pv, dout[qb + c + 1u], dv[c + 1u]);
                    dk[c + 1u] = fma(ds, q[qb + c + 1u], dk[c + 1u]);
                }
                if (has(c + 2u)) {
                    dv[c + 2u] = fma(pv, dout[qb + c + 2u], dv[c + 2u]);
                    dk[c + 2u] = fma(ds, q[qb + c + 2u], dk[c + 2u]);
                }
                if (has(c + 3u)) {
                    dv[c + 3u] = fma(pv, dout[qb + c + 3u], dv[c + 3u]);
                    dk[c + 3u] = fma(ds, q[qb + c + 3u], dk[c + 3u]);
                }
            }
        }
    }
    let sc = bitcast<f32>(p.scale);
    for (var c = 0u; c < p.d4; c++) {
        dk_out[kb + c] = dk[c] * sc;
        dv_out[kb + c] = dv[c];
    }
}
