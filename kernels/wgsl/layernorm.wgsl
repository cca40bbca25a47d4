// LayerNorm over rows: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps), the variance
// biased and taken about the mean in a second pass (no E[x^2] - mean^2 cancellation). One
// workgroup per row; tree reductions in workgroup memory.

struct P {
    rows: u32,
    cols: u32,
    eps: u32, // f32 bits
    pad: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd: array<f32>;

@compute @workgroup_size(256)
fn layernorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let o = row * p.cols;
    var s = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        s += x[o + j];
    }
    let mu = row_sum(s, lid) / f32(p.cols);
    var ss = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        let d = x[o + j] - mu;
        ss += d * d;
    }
    let r = 1.0 / sqrt(row_sum(ss, lid) / f32(p.cols) + bitcast<f32>(p.eps));
    for (var j = lid; j < p.cols; j += 256u) {
        y[o + j] = (x[o + j] - mu) * r * w[j] + b[j];
    }
    if (lid == 0u) {
        mean[row] = mu;
        rstd[row] = r;
    }
}
