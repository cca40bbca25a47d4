//! Plain f64 references, written for clarity, that each kernel is validated against.

pub fn rmsnorm(x: &[f32], w: &[f32], eps: f64) -> Vec<f64> {
    let c = w.len();
    x.chunks(c)
        .flat_map(|r| {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
            let s = 1.0 / (ms + eps).sqrt();
            r.iter().zip(w).map(move |(&v, &g)| v as f64 * s * g as f64)
        })
        .collect()
}

pub fn softmax(x: &[f32], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|r| {
            let m = r.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let z: f64 = r.iter().map(|&v| (v as f64 - m).exp()).sum();
            r.iter().map(move |&v| (v as f64 - m).exp() / z)
        })
        .collect()
}

pub fn nll(x: &[f32], cols: usize, targets: &[u32]) -> Vec<f64> {
    x.chunks(cols)
        .zip(targets)
        .map(|(r, &y)| {
            let m = r.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let lse = m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            lse - r[y as usize] as f64
        })
        .collect()
}

pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f64> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| (g as f64) / (1.0 + (-(g as f64)).exp()) * u as f64)
        .collect()
}

/// Rotate-half RoPE on `(rows, t, d)` with tables `(t, d/2)`.
pub fn rope(x: &[f32], cos: &[f64], sin: &[f64], t: usize, d: usize) -> Vec<f64> {
    let h = d / 2;
    let mut out = vec![0.0; x.len()];
    for (r, o) in x.chunks(t * d).zip(out.chunks_mut(t * d)) {
        for p in 0..t {
            for i in 0..h {
                let (x1, x2) = (r[p * d + i] as f64, r[p * d + i + h] as f64);
                let (c, s) = (cos[p * h + i], sin[p * h + i]);
                o[p * d + i] = x1 * c - x2 * s;
                o[p * d + i + h] = x2 * c + x1 * s;
            }
        }
    }
    out
}
