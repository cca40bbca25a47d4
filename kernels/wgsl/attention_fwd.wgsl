// Attention forward pass (appended to attention.wgsl).

@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(64)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let row = row_id(wid, nwg, lid);
    if (row >= p.batch * p.hq * p.t) { return; }
    let qr = query_row(row);
    let b = qr.b;
    let i = qr.i;
    let hk = qr.hk;
    let qb = qr.qb;
    var acc: array<vec4<f32>, 64>;
    var m = -3.4028235e38;
    var l = 0.0;
    let last = i + (p.s - p.t);
    for (var j = 0u; j <= last; j++) {
        let kb = kv_base(b, hk, j);
        let sc = qk(qb, kb);
        let m_new = max(m, sc);
        let corr = exp(m - m_new);
        let e = exp(sc - m_new);
        l = l * corr + e;
        for (var c = 0u; c < p.d4; c += 4u) {
            acc[c] = fma(acc[c], vec4(corr), e * v[kb + c]);
            if (has(c + 1u)) { acc[c + 1u] = fma(acc[c + 1u], vec4(corr), e * v[kb + c + 1u]); }
            if (has(c + 2u)) { acc[c + 2u] = fma(acc[c + 2u], vec4(corr), e * v[kb + c + 2u]); }
            if (has(c + 3u)) { acc[c + 3u] = fma(acc[c + 3u], vec4(corr), e * v[kb + c + 3u]); }
        }
        m = m_new;
    }
    for (var c = 0u; c < p.d4; c++) {
        o[qb + c] = acc[c] / l;
    }
    lse[row] = m + log(l);
}
