// Embedding lookup: out[i, c] = table[ids[i], c]. One invocation per output element.

struct P {
    n: u32,   // tokens * dim
    dim: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let k = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (k >= p.n) { return; }
    let i = k / p.dim;
    let c = k % p.dim;
    out[k] = table[ids[i] * p.dim + c];
}
