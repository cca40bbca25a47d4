// Fused LM-head loss, pass 2 on a recomputed chunk of logits z (rows, vocab): in place,
// z = coef_r * (softmax(z) - onehot(target)), whose transposed product with the chunk's hidden
// states accumulates the head's gradient. Softmax comes from the saved log-sum-exp; the
// target term is formed in f32 next to it.

struct P {
    n: u32,     // rows * vocab
    vocab: u32,
    row0: u32,  // first row of this chunk in lse / coef
    pad: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read_write> z: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>; // of the chunk's rows
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> coef: array<f32>;

@compute @workgroup_size(256)
fn head_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let k = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (k >= p.n) { return; }
    let r = k / p.vocab;
    let j = k % p.vocab;
    var g = exp(z[k] - lse[p.row0 + r]);
    if (j == targets[r]) {
        g -= 1.0;
    }
    z[k] = coef[p.row0 + r] * g;
}
