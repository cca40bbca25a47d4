// Backward of the unary ops: dx = dy * f'(x), using the saved output y where that is cheaper.

struct P {
    n: u32,
    op: u32,    // 0 exp, 1 log, 2 sigmoid, 3 silu, 4 neg, 5 scale, 6 gelu
    pad: u32,
    alpha: u32, // scale: the factor's f32 bits
}

@group(0) @binding(0) var<storage, read> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn unary_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) { return; }
    let g = dy[i];
    switch p.op {
        case 0u: { dx[i] = g * y[i]; }
        case 1u: { dx[i] = g / x[i]; }
        case 2u: { dx[i] = g * y[i] * (1.0 - y[i]); }
        case 3u: {
            let s = sigmoid(x[i]);
            dx[i] = g * (s + x[i] * s * (1.0 - s));
        }
        case 4u: { dx[i] = -g; }
        case 6u: {
            // Phi(x) + x phi(x); 0.39894228 = 1 / sqrt(2 pi).
            let v = x[i];
            dx[i] = g * (normal_cdf(v) + v * 0.39894228 * exp(-0.5 * v * v));
        }
        default: { dx[i] = g * bitcast<f32>(p.alpha); }
    }
}
