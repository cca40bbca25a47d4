// Embedding backward without atomics: dtable[v, c] = sum of dout[t, c] over the tokens t with
// id v, taken from a CSR grouping made on the host (start[v]..start[v + 1] indexes `tokens`,
// tokens in input order): deterministic, and every table element written exactly once.

struct P {
    n: u32,   // vocab * dim
    dim: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> dout: array<f32>;
@group(0) @binding(2) var<storage, read> start: array<u32>;
@group(0) @binding(3) var<storage, read> tokens: array<u32>;
@group(0) @binding(4) var<storage, read_write> dtable: array<f32>;

@compute @workgroup_size(256)
fn scatter_add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let k = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (k >= p.n) { return; }
    let v = k / p.dim;
    let c = k % p.dim;
    var s = 0.0;
    for (var j = start[v]; j < start[v + 1u]; j++) {
        s += dout[tokens[j] * p.dim + c];
    }
    dtable[k] = s;
}
