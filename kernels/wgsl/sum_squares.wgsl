// Partial sums of squares for the global gradient norm: workgroup k adds the squares of its
// SPAN consecutive values into partial[base + k]; the host adds every tensor's partials in f64.
// Each invocation loops SPAN / 256 times (software Vulkan caps a loop nest's iterations).

const SPAN: u32 = 16384u;

struct P {
    n: u32,
    base: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;

@compute @workgroup_size(256)
fn sum_squares(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let k = wid.y * nwg.x + wid.x;
    let start = k * SPAN;
    // The grid spread over x and y may hold a few workgroups past the end.
    if (start >= p.n) { return; }
    var s = 0.0;
    for (var j = lid; j < SPAN; j += 256u) {
        let i = start + j;
        if (i < p.n) {
            s += x[i] * x[i];
        }
    }
    let total = row_sum(s, lid);
    if (lid == 0u) {
        partial[p.base + k] = total;
    }
}
