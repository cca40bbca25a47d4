// LayerNorm backward, dx per row (one workgroup each): with xhat = (x - mean) * rstd and
// g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). (dw, db: layernorm_dwb.wgsl.)

struct P {
    rows: u32,
    cols: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> mean: array<f32>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn layernorm_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let o = row * p.cols;
    let mu = mean[row];
    let r = rstd[row];
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        let g = dy[o + j] * w[j];
        sg += g;
        sgx += g * (x[o + j] - mu) * r;
    }
    let mg = row_sum(sg, lid) / f32(p.cols);
    let mgx = row_sum(sgx, lid) / f32(p.cols);
    for (var j = lid; j < p.cols; j += 256u) {
        let xhat = (x[o + j] - mu) * r;
        dx[o + j] = r * (dy[o + j] * w[j] - mg - xhat * mgx);
    }
}
