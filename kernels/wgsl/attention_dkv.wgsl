// Attention backward, dk and dv per key row over the query heads of its group, reading D_i
// from the dq pass (appended to attention.wgsl).

@group(0) @binding(4) var<storage, read> saved_lse: array<f32>;
@group(0) @binding(5) var<storage, read> dout: array<f32>;
@group(0) @binding(6) var<storage, read> delta: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv_out: array<f32>;

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
    var dk: array<f32, 256>;
    var dv: array<f32, 256>;
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
            let pij = exp(qk(qb, kb) - saved_lse[qrow]);
            var dp = 0.0;
            for (var c = 0u; c < p.d; c++) {
                dp = fma(dout[qb + c], v[kb + c], dp);
            }
            let ds = pij * (dp - delta[qrow]);
            for (var c = 0u; c < p.d; c++) {
                dv[c] = fma(pij, dout[qb + c], dv[c]);
                dk[c] = fma(ds, q[qb + c], dk[c]);
            }
        }
    }
    let sc = bitcast<f32>(p.scale);
    for (var c = 0u; c < p.d; c++) {
        dk_out[kb + c] = dk[c] * sc;
        dv_out[kb + c] = dv[c];
    }
}
