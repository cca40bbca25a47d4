// Softmax and log-softmax over rows, one workgroup per row: max, then the sum of exp(x - max),
// each a tree reduction in workgroup memory. Backward: dx = y * (dy - sum(dy * y)) for
// softmax and dx = dy - exp(y) * sum(dy) for log-softmax.

struct P {
    rows: u32,
    cols: u32,
    log: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;       // forward: x; backward: y
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // forward: y; backward: dx
@group(0) @binding(3) var<storage, read> dy: array<f32>;      // backward only

@compute @workgroup_size(256)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let o = row * p.cols;
    var m = -3.4028235e38;
    for (var j = lid; j < p.cols; j += 256u) {
        m = max(m, x[o + j]);
    }
    m = row_max(m, lid);
    var s = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        s += exp(x[o + j] - m);
    }
    s = row_sum(s, lid);
    // WGSL's log near 1 is only accurate to an absolute 2^-21 (worse on some drivers), which
    // would leave 1 - y of a peaked row tens of percent off: softmax divides by the sum, and
    // log-softmax takes log(s) for s = 1 + t, t small, from its series.
    let log_s = log1p_small(s - 1.0);
    for (var j = lid; j < p.cols; j += 256u) {
        if (p.log == 1u) {
            y[o + j] = x[o + j] - m - log_s;
        } else {
            y[o + j] = exp(x[o + j] - m) / s;
        }
    }
}

@compute @workgroup_size(256)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let o = row * p.cols;
    var s = 0.0;
    for (var j = lid; j < p.cols; j += 256u) {
        if (p.log == 1u) {
            s += dy[o + j];
        } else {
            s += dy[o + j] * x[o + j];
        }
    }
    s = row_sum(s, lid);
    for (var j = lid; j < p.cols; j += 256u) {
        if (p.log == 1u) {
            y[o + j] = dy[o + j] - exp(x[o + j]) * s;
        } else {
            y[o + j] = x[o + j] * (dy[o + j] - s);
        }
    }
}
