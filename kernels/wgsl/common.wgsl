// Helpers shared by the kernels: the launchers prepend this file to every shader, so each
// kernel file holds only its bindings and entry points.

// Scratch for the workgroup-wide tree reductions of 256 invocations.
var<workgroup> red: array<f32, 256>;

// The flat index of an invocation in a 256-wide grid spread over x and y.
fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// Split by sign so exp never overflows.
fn sigmoid(v: f32) -> f32 {
    if (v >= 0.0) {
        return 1.0 / (1.0 + exp(-v));
    }
    let e = exp(v);
    return e / (1.0 + e);
}

// erf(v) from the Chebyshev fit of erfc in Numerical Recipes (fractional error under 1.2e-7
// everywhere): WGSL has no erf builtin.
fn erf(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let r = 1.0 - t * exp(poly);
    return select(-r, r, v >= 0.0);
}

// The exact GELU's CDF factor: Phi(v) = (1 + erf(v / sqrt 2)) / 2.
fn normal_cdf(v: f32) -> f32 {
    return 0.5 * (1.0 + erf(v * 0.70710678));
}

// Sum of `v` over the 256 invocations of a workgroup (every invocation must call it).
fn row_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

// Maximum of `v` over the 256 invocations of a workgroup (every invocation must call it).
fn row_max(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    return m;
}

// log(1 + t): a five-term series below t = 0.01 (error under t^6 / 6), the builtin above.
// WGSL's log near 1 is only accurate to an absolute 2^-21 (worse on some drivers).
fn log1p_small(t: f32) -> f32 {
    if (t < 0.01) {
        return t * (1.0 - t * (0.5 - t * (1.0 / 3.0 - t * (0.25 - t * 0.2))));
    }
    return log(1.0 + t);
}

