// Attention backward, dq and D_i = dO_i . O_i per query row (appended to attention.wgsl).

@group(0) @binding(4) var<storage, read> saved_o: array<f32>;
@group(0) @binding(5) var<storage, read> saved_lse: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> delta: array<f32>;

@compute @workgroup_size(64)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = row_id(wid, nwg, lid);
    if (row >= p.batch * p.hq * p.t) { return; }
    let qr = query_row(row);
    let b = qr.b;
    let i = qr.i;
    let hk = qr.hk;
    let qb = qr.qb;
    var di = 0.0;
    for (var c = 0u; c < p.d; c++) {
        di = fma(dout[qb + c], saved_o[qb + c], di);
    }
    delta[row] = di;
    var dq: array<f32, 256>;
    let l = saved_lse[row];
    let last = i + (p.s - p.t);
    for (var j = 0u; j <= last; j++) {
        let kb = kv_base(b, hk, j);
        let pij = exp(qk(qb, kb) - l);
        var dp = 0.0;
        for (var c = 0u; c < p.d; c++) {
            dp = fma(dout[qb + c], v[kb + c], dp);
        }
        let ds = pij * (dp - di);
        for (var c = 0u; c < p.d; c++) {
            dq[c] = fma(ds, k[kb + c], dq[c]);
        }
    }
    let sc = bitcast<f32>(p.scale);
    for (var c = 0u; c < p.d; c++) {
        dq_out[qb + c] = dq[c] * sc;
    }
}

