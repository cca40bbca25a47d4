// Batched GEMM: C (batch, m, n) = op(A) (m, k) . op(B) (k, n), optionally accumulated into C.
// A workgroup of 16 x 16 invocations computes a 64 x 64 tile of C, each invocation a 4 x 4
// block held in registers; A and B stream through workgroup memory 16 values of k at a time.
// Tile loads map consecutive invocations to consecutive addresses of whichever layout an
// operand is stored in (transposed or not).

struct P {
    m: u32,
    n: u32,
    k: u32,
    ta: u32,   // A stored (k, m)
    tb: u32,   // B stored (n, k)
    a_bs: u32, // elements between batch matrices of A (0: one A for every batch)
    b_bs: u32,
    acc: u32,  // 1: C += op(A) op(B)
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

var<workgroup> As: array<f32, 1024>; // [kk * 64 + row]
var<workgroup> Bs: array<f32, 1024>; // [kk * 64 + col]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let batch = wid.z;
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let a_off = batch * p.a_bs;
    let b_off = batch * p.b_bs;
    let t = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        for (var e = 0u; e < 4u; e++) {
            let idx = t * 4u + e;
            // A tile element (kk, r): k fastest when A is stored (m, k), rows fastest if (k, m).
            var kk = idx % 16u;
            var r = idx / 16u;
            if (p.ta == 1u) {
                kk = idx / 64u;
                r = idx % 64u;
            }
            var v = 0.0;
            if (row0 + r < p.m && k0 + kk < p.k) {
                if (p.ta == 0u) {
                    v = a[a_off + (row0 + r) * p.k + k0 + kk];
                } else {
                    v = a[a_off + (k0 + kk) * p.m + row0 + r];
                }
            }
            As[kk * 64u + r] = v;
            // B tile element (kk, col): columns fastest when B is stored (k, n), k if (n, k).
            var bk = idx / 64u;
            var cc = idx % 64u;
            if (p.tb == 1u) {
                bk = idx % 16u;
                cc = idx / 16u;
            }
            var w = 0.0;
            if (col0 + cc < p.n && k0 + bk < p.k) {
                if (p.tb == 0u) {
                    w = b[b_off + (k0 + bk) * p.n + col0 + cc];
                } else {
                    w = b[b_off + (col0 + cc) * p.k + k0 + bk];
                }
            }
            Bs[bk * 64u + cc] = w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = As[kk * 64u + lid.y * 4u + i];
                bv[i] = Bs[kk * 64u + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(av[i], bv[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let r = row0 + lid.y * 4u + i;
            let cc = col0 + lid.x * 4u + j;
            if (r < p.m && cc < p.n) {
                let o = batch * p.m * p.n + r * p.n + cc;
                if (p.acc == 1u) {
                    c[o] = c[o] + acc[i * 4u + j];
                } else {
                    c[o] = acc[i * 4u + j];
                }
            }
        }
    }
}
