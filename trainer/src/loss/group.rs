//! Group confidence: the lowest sliding-window mean of a sample's token confidences
//! (DESIGN.md §5). Windows run over the compacted valid tokens, so a window may span two
//! assistant turns.

/// How a window's confidences are averaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GroupMean {
    /// `mean(c_t)`: the paper's definition (default).
    #[default]
    Arithmetic,
    /// `exp(mean(log c_t))`: the authors' released code.
    Geometric,
}

impl std::str::FromStr for GroupMean {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "arithmetic" => Ok(GroupMean::Arithmetic),
            "geometric" => Ok(GroupMean::Geometric),
            other => Err(format!(
                "unknown group mean {other:?} (expected arithmetic or geometric)"
            )),
        }
    }
}

/// Window length and mean of the group confidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// Tokens per window, g >= 1 (default 256).
    pub window: usize,
    pub mean: GroupMean,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            window: 256,
            mean: GroupMean::Arithmetic,
        }
    }
}

/// The weakest window of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weakest {
    /// `p_conf = min_i C_i`.
    pub p_conf: f64,
    /// Index (among the valid tokens) where the first weakest window starts.
    pub start: usize,
}

/// `min_i C_i` over windows of `cfg.window` valid tokens with stride 1 (valid-window semantics:
/// no padding). With fewer tokens than a window, one window covers all of them; with none,
/// there is no window (`None`).
pub fn weakest_window(logprobs: &[f64], cfg: GroupConfig) -> Option<Weakest> {
    let n = logprobs.len();
    if n == 0 {
        return None;
    }
    let g = cfg.window.clamp(1, n);
    // The averaged quantity: c_t for the arithmetic mean, log c_t for the geometric one.
    let value = |lp: f64| match cfg.mean {
        GroupMean::Arithmetic => lp.exp(),
        GroupMean::Geometric => lp,
    };
    let mut sum: f64 = logprobs[..g].iter().map(|&lp| value(lp)).sum();
    let mut best = Weakest {
        p_conf: sum,
        start: 0,
    };
    for i in 1..=n - g {
        // Slide by one: add the entering token, drop the leaving one.
        sum += value(logprobs[i + g - 1]) - value(logprobs[i - 1]);
        if sum < best.p_conf {
            best = Weakest {
                p_conf: sum,
                start: i,
            };
        }
    }
    best.p_conf /= g as f64;
    if cfg.mean == GroupMean::Geometric {
        best.p_conf = best.p_conf.exp();
    }
    Some(best)
}
