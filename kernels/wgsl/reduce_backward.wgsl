// The gradient of a reduction over the axis of (outer, size, inner): g (outer, inner) copied
// along the axis for a sum, routed to the saved first maximal index for a max. One invocation
// per element of dx.

struct P {
    outer: u32,
    size: u32,
    inner: u32,
    kind: u32, // 0 sum (idx is bound but unread), 1 max
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn reduce_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let e = flat(wid, nwg, lid);
    if (e >= p.outer * p.size * p.inner) { return; }
    let i = e % p.inner;
    let s = (e / p.inner) % p.size;
    let r = (e / (p.size * p.inner)) * p.inner + i;
    if (p.kind == 0u || idx[r] == s) {
        dx[e] = g[r];
    } else {
        dx[e] = 0.0;
    }
}
