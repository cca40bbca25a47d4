// AdamW fused into one pass, in place: decay, moments, bias-corrected update; the gradient is
// scaled by the clipping factor on the way in, so clipping costs no pass of its own.

struct P {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32, // from f64 on the host: 1 - beta1 rounded once, not twice
    one_minus_beta2: f32,
    eps: f32,
    wd: f32,
    bias1: f32,     // 1 - beta1^t
    bias2: f32,     // 1 - beta2^t
    grad_scale: f32, // the clipping factor
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) { return; }
    let gi = g[i] * p.grad_scale;
    var wi = w[i];
    wi -= p.lr * p.wd * wi;
    let mi = p.beta1 * m[i] + p.one_minus_beta1 * gi;
    let vi = p.beta2 * v[i] + p.one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi - p.lr * (mi / p.bias1) / (sqrt(vi / p.bias2) + p.eps);
}
