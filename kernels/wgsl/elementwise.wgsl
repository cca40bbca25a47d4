// Elementwise kernels: unary ops, binary ops with `b` tiled over the rows of `a`, per-row
// scaling, column sums (the gradient of a broadcast operand) and scale. One invocation per
// element; the launcher spreads workgroups over x and y past 65,535 (index = flat id).

struct P {
    n: u32,     // elements of the output
    op: u32,    // unary: 0 exp, 1 log, 2 sigmoid, 3 silu, 4 neg, 5 scale, 6 gelu; binary: 0 add, 1 sub, 2 mul, 3 div
    nb: u32,    // binary: length of b (divides n); sum_rows: columns
    alpha: u32, // scale: the factor's f32 bits
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) { return; }
    let v = x[i];
    switch p.op {
        case 0u: { y[i] = exp(v); }
        case 1u: { y[i] = log(v); }
        case 2u: { y[i] = sigmoid(v); }
        case 3u: { y[i] = v * sigmoid(v); }
        case 4u: { y[i] = -v; }
        case 6u: { y[i] = v * normal_cdf(v); }
        default: { y[i] = bitcast<f32>(p.alpha) * v; }
    }
}

// binary(a = x, b = xb) -> y
@group(0) @binding(3) var<storage, read> xb: array<f32>;

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) { return; }
    let a = x[i];
    let b = xb[i % p.nb];
    switch p.op {
        case 0u: { y[i] = a + b; }
        case 1u: { y[i] = a - b; }
        case 2u: { y[i] = a * b; }
        default: { y[i] = a / b; }
    }
}

// scale_rows: y[i] = a[i] * b[i / nb]: each row of length nb scaled by its own factor.
@compute @workgroup_size(256)
fn scale_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) { return; }
    y[i] = x[i] * xb[i / p.nb];
}

// sum_rows: y[j] = sum_r x[r * nb + j], rows in order (deterministic). n = nb outputs.
@compute @workgroup_size(256)
fn sum_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let j = flat(wid, nwg, lid);
    if (j >= p.nb) { return; }
    let rows = p.n / p.nb;
    var s = 0.0;
    for (var r = 0u; r < rows; r++) {
        s += x[r * p.nb + j];
    }
    y[j] = s;
}
