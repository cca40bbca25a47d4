// SwiGLU: y = silu(gate) * up, and its backward dgate = dy * up * silu'(gate),
// dup = dy * silu(gate). One invocation per element.

struct P {
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;     // forward: y; backward: dgate
@group(0) @binding(4) var<storage, read> dy: array<f32>;          // backward only
@group(0) @binding(5) var<storage, read_write> dup: array<f32>;   // backward only

@compute @workgroup_size(256)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) { return; }
    let g = gate[i];
    y[i] = g * sigmoid(g) * up[i];
}

@compute @workgroup_size(256)
fn swiglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) { return; }
    let g = gate[i];
    let s = sigmoid(g);
    y[i] = dy[i] * up[i] * s * (1.0 + g * (1.0 - s));
    dup[i] = dy[i] * g * s;
}
