// Casts between f32 and 16-bit floats (f16, bf16) stored two to a u32 word, element 2i in the
// low half: the little-endian layout of a u16 array, so host bytes upload as they are. Packed
// words need no SHADER_F16, so 16-bit storage works on every adapter; arithmetic stays f32.
// Rounding is to nearest, ties to even, with IEEE overflow to infinity and f16 subnormals, as
// the `half` crate on the host, so both backends store the same bits.

struct P {
    n: u32,    // elements
    kind: u32, // 0 f16, 1 bf16
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read_write> packed: array<u32>;
@group(0) @binding(2) var<storage, read_write> wide: array<f32>;

fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u | ((a >> 13u) & 0x3ffu); // NaN, made quiet
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u; // 65520 and above round to infinity
    }
    if (a >= 0x38800000u) {
        // Normal: rebias the exponent (127 -> 15), round the 13 dropped bits to even; a carry
        // into the exponent is the correct next binade.
        let m = a - 0x38000000u;
        return sign | ((m + 0xfffu + ((m >> 13u) & 1u)) >> 13u);
    }
    if (a <= 0x33000000u) {
        return sign; // at most 2^-25: rounds to zero (2^-25 itself ties to the even zero)
    }
    // Subnormal: the value in units of 2^-24 is the full mantissa shifted right by 126 - e.
    let e = a >> 23u;
    let mant = (a & 0x7fffffu) | 0x800000u;
    let s = 126u - e;
    var q = mant >> s;
    let rem = mant & ((1u << s) - 1u);
    let half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u) == 1u)) {
        q += 1u;
    }
    return sign | q;
}

fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u; // NaN, made quiet
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn from_f16(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604645e-8)); // m * 2^-24, exact
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn to_bits(x: f32) -> u32 {
    if (p.kind == 0u) {
        return f16_bits(x);
    }
    return bf16_bits(x);
}

// One invocation per word: both halves are written together, so no two invocations share one.
@compute @workgroup_size(256)
fn narrow(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let w = flat(wid, nwg, lid);
    let i = 2u * w;
    if (i >= p.n) { return; }
    var word = to_bits(wide[i]);
    if (i + 1u < p.n) {
        word |= to_bits(wide[i + 1u]) << 16u;
    }
    packed[w] = word;
}

@compute @workgroup_size(256)
fn widen(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) { return; }
    let h = (packed[i / 2u] >> (16u * (i % 2u))) & 0xffffu;
    if (p.kind == 0u) {
        wide[i] = from_f16(h);
    } else {
        wide[i] = bitcast<f32>(h << 16u);
    }
}
