// RMSNorm backward, dx per row (one workgroup each): with g = dy * w,
// dx = rstd * g - x * rstd^3 * sum(g * x) / cols. (dw is rmsnorm_dw.wgsl.)

struct P {
    rows: u32,
    cols: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> rstd: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>; // dx (rows, cols)

@compute @workgroup_size(256)
fn rmsnorm_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let o = row * p.cols;
    var gx = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        gx += dy[o + j] * w[j] * x[o + j];
    }
    let r = rstd[row];
    let k = r * r * r * row_sum(gx, lid) / f32(p.cols);
    for (var j = lid; j < p.cols; j += 256u) {
        out[o + j] = r * dy[o + j] * w[j] - x[o + j] * k;
    }
}
