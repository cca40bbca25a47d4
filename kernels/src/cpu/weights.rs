//! A loss's weights from its tokens' log-probs (DESIGN.md §5), on the host in f64: each
//! sample's group confidence (the lowest sliding-window mean confidence) and weight, each
//! token's weight and coefficient, and the per-sample sums the statistics are made of. The
//! CUDA kernels `sample_weights`, `token_coef` and `sample_sums` compute the same.

/// How tokens and samples are weighed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weighing {
    /// Tokens a window of the group confidence (at least 1; a sample with fewer has one window).
    pub window: usize,
    /// `exp(mean log c)` over a window instead of `mean c`.
    pub geometric: bool,
    /// BFT's exponent: `s_b = clamp(1 - p_conf^gamma, 0, 1)`; `None`: every sample weighs 1.
    pub gamma: Option<f64>,
    /// Token weights `max(c_t, floor)`; `None`: every token weighs 1.
    pub token_floor: Option<f64>,
    /// The number of samples the loss averages over.
    pub denom: f64,
}

impl Weighing {
    /// `w_t` of a token with log-prob `lp`.
    pub fn token_weight(&self, lp: f64) -> f64 {
        self.token_floor.map_or(1.0, |f| lp.exp().max(f))
    }
}

/// The lowest mean confidence over windows of `window` tokens (stride 1) of one sample's
/// log-probs, and where that window starts; `None` without tokens.
pub fn weakest_window(logprobs: &[f64], window: usize, geometric: bool) -> Option<(f64, usize)> {
    let n = logprobs.len();
    if n == 0 {
        return None;
    }
    let g = window.clamp(1, n);
    let value = |lp: f64| if geometric { lp } else { lp.exp() };
    let mut sum: f64 = logprobs[..g].iter().map(|&lp| value(lp)).sum();
    let (mut best, mut start) = (sum, 0);
    for i in 1..=n - g {
        sum += value(logprobs[i + g - 1]) - value(logprobs[i - 1]);
        if sum < best {
            (best, start) = (sum, i);
        }
    }
    let mean = best / g as f64;
    Some((if geometric { mean.exp() } else { mean }, start))
}

/// Per-sample and per-token results of [`weigh`].
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// Each token's `a_t = s_b w_t / (denom (n_b + 1e-8))`.
    pub coef: Vec<f64>,
    /// Each sample's `s_b` (1 without tokens).
    pub s_b: Vec<f64>,
    /// Each sample's group confidence (1 without tokens).
    pub p_conf: Vec<f64>,
    /// `3` per sample: the sums of `log c_t`, `w_t log c_t` and `w_t` over its tokens.
    pub sums: Vec<f64>,
}

/// Weighs samples whose tokens' log-probs lie end to end in `logprobs`, sample `b`'s at
/// `starts[b]..starts[b + 1]` (checked by the caller).
pub fn weigh(logprobs: &[f64], starts: &[u32], w: Weighing) -> Weights {
    let batch = starts.len().saturating_sub(1);
    let mut out = Weights {
        coef: vec![0.0; logprobs.len()],
        s_b: vec![1.0; batch],
        p_conf: vec![1.0; batch],
        sums: vec![0.0; 3 * batch],
    };
    for b in 0..batch {
        let (lo, hi) = (starts[b] as usize, starts[b + 1] as usize);
        let lp = &logprobs[lo..hi];
        if let Some((p, _)) = weakest_window(lp, w.window, w.geometric) {
            out.p_conf[b] = p;
            if let Some(gamma) = w.gamma {
                out.s_b[b] = (1.0 - p.powf(gamma)).clamp(0.0, 1.0);
            }
        }
        let norm = w.denom * (lp.len() as f64 + 1e-8);
        for (t, &l) in lp.iter().enumerate() {
            let wt = w.token_weight(l);
            out.coef[lo + t] = out.s_b[b] * wt / norm;
            out.sums[3 * b] += l;
            out.sums[3 * b + 1] += wt * l;
            out.sums[3 * b + 2] += wt;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bft_weights_by_hand() {
        // Sample 0: two tokens of confidence 0.5 and 0.25, window 1; sample 1: none.
        let lp = [0.5f64.ln(), 0.25f64.ln()];
        let w = Weighing {
            window: 1,
            geometric: false,
            gamma: Some(1.0),
            token_floor: Some(0.0),
            denom: 2.0,
        };
        let out = weigh(&lp, &[0, 2, 2], w);
        assert_eq!(out.p_conf, vec![0.25, 1.0]);
        assert_eq!(out.s_b, vec![0.75, 1.0]);
        let norm = 2.0 * (2.0 + 1e-8);
        assert_eq!(out.coef, vec![0.75 * 0.5 / norm, 0.75 * 0.25 / norm]);
        assert_eq!(
            &out.sums[..3],
            &[lp[0] + lp[1], 0.5 * lp[0] + 0.25 * lp[1], 0.75]
        );
        assert_eq!(&out.sums[3..], &[0.0, 0.0, 0.0]);
        // A window longer than the sample is the whole sample; the geometric mean of 0.5 and
        // 0.25 is sqrt(0.125).
        let (p, start) = weakest_window(&lp, 8, true).unwrap();
        assert!((p - 0.125f64.sqrt()).abs() < 1e-15 && start == 0);
    }
}
