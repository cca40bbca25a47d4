// Attention backward, dq and D_i = dO_i . O_i per query row (appended to attention_bwd.wgsl).

@group(0) @binding(6) var<storage, read> saved_o: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> dq_out: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> delta: array<f32>;

@compute @workgroup_size(64)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = row_id(wid, nwg, lid);
    if (row >= p.batch * p.hq * p.t) { return; }
    let qr = query_row(row);
    let qb = qr.qb;
    var dsum = vec4<f32>(0.0);
    for (var c = 0u; c < p.d4; c++) {
        dsum = fma(dout[qb + c], saved_o[qb + c], dsum);
    }
    let di = hsum(dsum);
    delta[row] = di;
    var dq: array<vec4<f32>, 64>;
    let l = saved_lse[row];
    let last = qr.i + (p.s - p.t);
    for (var j = 0u; j <= last; j++) {
        let kb = kv_base(qr.b, qr.hk, j);
        let dt = dots(qb, kb);
        let ds = vec4(exp(dt.score - l) * (dt.dp - di));
        for (var c = 0u; c < p.d4; c += 4u) {
            dq[c] = fma(ds, k[kb + c], dq[c]);
            if (has(c + 1u)) { dq[c + 1u] = fma(ds, k[kb + c + 1u], dq[c + 1u]); }
            if (has(c + 2u)) { dq[c + 2u] = fma(ds, k[kb + c + 2u], dq[c + 2u]); }
            if (has(c + 3u)) { dq[c + 3u] = fma(ds, k[kb + c + 3u], dq[c + 3u]); }
        }
    }
    let sc = bitcast<f32>(p.scale);
    for (var c = 0u; c < p.d4; c++) {
        dq_out[qb + c] = dq[c] * sc;
    }
}
