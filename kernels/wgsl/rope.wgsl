// Rotary position embedding, HF's rotate-half convention, for x (rows, t, d) with tables
// cos, sin (t, d / 2): out[..h] = x1 cos - x2 sin, out[h..] = x2 cos + x1 sin. `inverse`
// rotates back (the backward pass). One invocation per pair (x1, x2).

struct P {
    pairs: u32, // rows * t * h
    t: u32,
    h: u32,     // d / 2
    inverse: u32,
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let k = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (k >= p.pairs) { return; }
    let i = k % p.h;
    let row_pos = k / p.h;            // rows * t index
    let pos = row_pos % p.t;
    let base = row_pos * 2u * p.h;
    let c = cos_t[pos * p.h + i];
    var s = sin_t[pos * p.h + i];
    if (p.inverse == 1u) {
        s = -s;
    }
    let x1 = x[base + i];
    let x2 = x[base + i + p.h];
    y[base + i] = x1 * c - x2 * s;
    y[base + i + p.h] = x2 * c + x1 * s;
}
