// Data movement on 32-bit elements (f32 or u32 bits alike): axis permutation, slab copies (narrow
// reads a slab, cat writes one), and fills. One invocation per output element.

struct P {
    n: u32,       // elements to write
    rank: u32,    // permute: axes (at most 6)
    src_dim: u32, // slab: middle-axis sizes and offsets
    src_at: u32,
    dst_dim: u32,
    dst_at: u32,
    len: u32,     // slab: middle-axis length copied
    inner: u32,   // slab: elements per middle-axis step; fill: the value's bits
    // permute: output dims, then the input stride of each output axis
    out_dims: array<u32, 6>,
    in_strides: array<u32, 6>,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(256)
fn permute(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) { return; }
    var rest = i;
    var src_i = 0u;
    for (var a = 0u; a < p.rank; a++) {
        let axis = p.rank - 1u - a;
        let d = p.out_dims[axis];
        src_i += (rest % d) * p.in_strides[axis];
        rest /= d;
    }
    dst[i] = src[src_i];
}

// dst (outer, dst_dim, inner)[:, dst_at + j, :] = src (outer, src_dim, inner)[:, src_at + j, :]
// for j < len; n = outer * len * inner.
@compute @workgroup_size(256)
fn slab(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let k = flat(wid, nwg, lid);
    if (k >= p.n) { return; }
    let r = k % p.inner;
    let j = (k / p.inner) % p.len;
    let o = k / (p.inner * p.len);
    dst[(o * p.dst_dim + p.dst_at + j) * p.inner + r] = src[(o * p.src_dim + p.src_at + j) * p.inner + r];
}
