// Reductions over one axis of x viewed as (outer, size, inner), the axis removed: one workgroup
// per output (outer * inner of them), its invocations striding the axis, then a tree reduction.
// Any axis works: the first, the last, or one in the middle (strided reads).

struct P {
    outer: u32,
    size: u32,
    inner: u32,
    kind: u32, // reduce_backward: 0 sum (idx unread), 1 max
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// The output this workgroup reduces and the offset of its first input.
fn output_of(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    let r = wid.y * nwg.x + wid.x;
    return vec2(r, (r / p.inner) * p.size * p.inner + r % p.inner);
}

@compute @workgroup_size(256)
fn reduce_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let at = output_of(wid, nwg);
    if (at.x >= p.outer * p.inner) { return; }
    var s = 0.0;
    for (var j = lid; j < p.size; j += 256u) {
        s += x[at.y + j * p.inner];
    }
    s = row_sum(s, lid);
    if (lid == 0u) {
        y[at.x] = s;
    }
}

@group(0) @binding(3) var<storage, read_write> idx: array<u32>;

const NONE: u32 = 0xffffffffu;
var<workgroup> red_idx: array<u32, 256>;

// The maximum and the index of its first occurrence, as the CPU kernel: an element replaces the
// best so far only when greater, so a NaN counts only as the axis' first element.
@compute @workgroup_size(256)
fn reduce_max(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let at = output_of(wid, nwg);
    if (at.x >= p.outer * p.inner) { return; }
    var m = 0.0;
    var k = NONE;
    for (var j = lid; j < p.size; j += 256u) {
        let v = x[at.y + j * p.inner];
        if ((k == NONE && (j == 0u || v == v)) || v > m) {
            m = v;
            k = j;
        }
    }
    red[lid] = m;
    red_idx[lid] = k;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let b = red[lid + s];
            let bk = red_idx[lid + s];
            let a = red[lid];
            let ak = red_idx[lid];
            if (bk != NONE && (ak == NONE || b > a || (b == a && bk < ak))) {
                red[lid] = b;
                red_idx[lid] = bk;
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        y[at.x] = red[0];
        idx[at.x] = red_idx[0];
    }
}
