// Fused LM-head loss, pass 1 on a chunk of logits z (rows, vocab) that a GEMM just formed:
// per row the log-sum-exp and the target's logit (one workgroup per row, tree reductions in
// workgroup memory); with `unit` set, z becomes softmax(z) - onehot(target) in place, the
// direction whose product with the head is each row's hidden-state gradient.

struct P {
    rows: u32,
    vocab: u32,
    unit: u32,
    row0: u32, // first row of this chunk in the lse / target-logit outputs
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read_write> z: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>; // of the chunk's rows
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> tl: array<f32>;

@compute @workgroup_size(256)
fn head_lse(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let r = wid.y * nwg.x + wid.x;
    if (r >= p.rows) { return; }
    let o = r * p.vocab;
    var m = -3.4028235e38;
    for (var j = lid; j < p.vocab; j += 256u) {
        m = max(m, z[o + j]);
    }
    m = row_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < p.vocab; j += 256u) {
        s += exp(z[o + j] - m);
    }
    s = row_sum(s, lid);
    let y = targets[r];
    let l = m + log1p_small(s - 1.0);
    if (lid == 0u) {
        lse[p.row0 + r] = l;
        tl[p.row0 + r] = z[o + y];
    }
    workgroupBarrier();
    if (p.unit == 1u) {
        for (var j = lid; j < p.vocab; j += 256u) {
            var g = exp(z[o + j] - m) / s;
            if (j == y) {
                g -= 1.0;
            }
            z[o + j] = g;
        }
    }
}
