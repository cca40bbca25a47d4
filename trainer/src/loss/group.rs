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
/// there is no window (`None`). The engine's weighing computes the same on a device.
pub fn weakest_window(logprobs: &[f64], cfg: GroupConfig) -> Option<Weakest> {
    let geometric = cfg.mean == GroupMean::Geometric;
    bft_engine::ops::weakest_window(logprobs, cfg.window, geometric)
        .map(|(p_conf, start)| Weakest { p_conf, start })
}
