// RMSNorm over rows: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps). One workgroup per row;
// the row statistic is a tree reduction in workgroup memory (no subgroup size assumed).

struct P {
    rows: u32,
    cols: u32,
    eps: u32, // f32 bits
    pad: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;

@compute @workgroup_size(256)
fn rmsnorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let o = row * p.cols;
    var ss = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        ss += x[o + j] * x[o + j];
    }
    let r = 1.0 / sqrt(row_sum(ss, lid) / f32(p.cols) + bitcast<f32>(p.eps));
    for (var j = lid; j < p.cols; j += 256u) {
        y[o + j] = x[o + j] * r * w[j];
    }
    if (lid == 0u) {
        rstd[row] = r;
    }
}
