//! The built-in variants, each implemented through the public [`LossVariant`] trait.

use super::group::{GroupConfig, GroupMean, weakest_window};
use super::{DeviceWeights, LossError, LossVariant, SampleWeights};

/// Plain cross-entropy: every token and sample weighs 1.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sft;

impl LossVariant for Sft {
    fn name(&self) -> &str {
        "sft"
    }
    fn weigh(&self, logprobs: &[f64]) -> SampleWeights {
        SampleWeights {
            tokens: vec![1.0; logprobs.len()],
            sample: 1.0,
        }
    }
    fn device_weights(&self) -> Option<DeviceWeights> {
        Some(DeviceWeights {
            group: None,
            gamma: None,
            token_floor: None,
        })
    }
}

/// Dynamic fine-tuning: each token weighs its own probability `sg(c_t)`, floored at `floor`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dft {
    pub floor: f64,
}

impl LossVariant for Dft {
    fn name(&self) -> &str {
        "dft"
    }
    fn weigh(&self, logprobs: &[f64]) -> SampleWeights {
        SampleWeights {
            tokens: logprobs.iter().map(|lp| lp.exp().max(self.floor)).collect(),
            sample: 1.0,
        }
    }
    fn device_weights(&self) -> Option<DeviceWeights> {
        Some(DeviceWeights {
            group: None,
            gamma: None,
            token_floor: Some(self.floor),
        })
    }
}

/// Balanced fine-tuning: DFT's token weights (unless `token_weights` is off: the
/// `bft-no-token` ablation) and the sample weight `s_b = clamp(1 - p_conf^gamma, 0, 1)`.
#[derive(Clone, Copy, Debug)]
pub struct Bft {
    pub group: GroupConfig,
    pub gamma: f64,
    pub floor: f64,
    pub token_weights: bool,
}

impl Default for Bft {
    fn default() -> Self {
        Bft {
            group: GroupConfig::default(),
            gamma: 1.0,
            floor: 0.0,
            token_weights: true,
        }
    }
}

impl Bft {
    /// `s_b` for a sample; 1 when it has no valid token (its loss term is 0 regardless).
    pub fn sample_weight(&self, logprobs: &[f64]) -> f64 {
        weakest_window(logprobs, self.group)
            .map_or(1.0, |w| (1.0 - w.p_conf.powf(self.gamma)).clamp(0.0, 1.0))
    }
}

impl LossVariant for Bft {
    fn name(&self) -> &str {
        if self.token_weights {
            "bft"
        } else {
            "bft-no-token"
        }
    }
    fn weigh(&self, logprobs: &[f64]) -> SampleWeights {
        let tokens = if self.token_weights {
            logprobs.iter().map(|lp| lp.exp().max(self.floor)).collect()
        } else {
            vec![1.0; logprobs.len()]
        };
        SampleWeights {
            tokens,
            sample: self.sample_weight(logprobs),
        }
    }
    fn device_weights(&self) -> Option<DeviceWeights> {
        Some(DeviceWeights {
            group: Some(self.group),
            gamma: Some(self.gamma),
            token_floor: self.token_weights.then_some(self.floor),
        })
    }
}

/// Focal loss with a detached modulating factor: `w_t = sg((1 - c_t)^gamma)`. Like DFT's
/// weight it is a constant for the gradient; the paper compares its run time with BFT's.
#[derive(Clone, Copy, Debug)]
pub struct Focal {
    pub gamma: f64,
}

impl LossVariant for Focal {
    fn name(&self) -> &str {
        "focal"
    }
    fn weigh(&self, logprobs: &[f64]) -> SampleWeights {
        SampleWeights {
            tokens: logprobs
                .iter()
                .map(|lp| (1.0 - lp.exp()).max(0.0).powf(self.gamma))
                .collect(),
            sample: 1.0,
        }
    }
}

/// Settings shared by the built-in variants, as a config file or the CLI gives them.
#[derive(Clone, Copy, Debug)]
pub struct VariantParams {
    pub group: GroupConfig,
    /// BFT's exponent on p_conf.
    pub gamma: f64,
    /// Floor of DFT/BFT token weights.
    pub floor: f64,
    /// Focal loss exponent.
    pub focal_gamma: f64,
}

impl Default for VariantParams {
    fn default() -> Self {
        VariantParams {
            group: GroupConfig::default(),
            gamma: 1.0,
            floor: 0.0,
            focal_gamma: 2.0,
        }
    }
}

/// Names accepted by [`builtin`].
pub const BUILTIN_NAMES: &[&str] = &[
    "sft",
    "dft",
    "bft",
    "bft-no-token",
    "bft-no-sample",
    "focal",
];

/// A built-in variant by name; `bft-no-sample` is DFT (the paper's ablation).
pub fn builtin(name: &str, p: VariantParams) -> Result<Box<dyn LossVariant>, LossError> {
    if p.group.window == 0 {
        return Err(LossError::Config(
            "the group window must be at least 1 token".into(),
        ));
    }
    // Written so that NaN fails every test.
    let gamma_ok = p.gamma > 0.0 && p.gamma.is_finite();
    let focal_ok = p.focal_gamma >= 0.0 && p.focal_gamma.is_finite();
    if !(0.0..=1.0).contains(&p.floor) || !gamma_ok || !focal_ok {
        return Err(LossError::Config(format!(
            "need 0 <= floor <= 1, finite gamma > 0 and finite focal gamma >= 0 (got floor {}, gamma {}, focal gamma {})",
            p.floor, p.gamma, p.focal_gamma
        )));
    }
    let bft = Bft {
        group: p.group,
        gamma: p.gamma,
        floor: p.floor,
        token_weights: true,
    };
    Ok(match name {
        "sft" => Box::new(Sft),
        "dft" | "bft-no-sample" => Box::new(Dft { floor: p.floor }),
        "bft" => Box::new(bft),
        "bft-no-token" => Box::new(Bft {
            token_weights: false,
            ..bft
        }),
        "focal" => Box::new(Focal {
            gamma: p.focal_gamma,
        }),
        other => {
            return Err(LossError::Config(format!(
                "unknown loss variant {other:?}; expected one of {}",
                BUILTIN_NAMES.join(", ")
            )));
        }
    })
}

impl GroupMean {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            GroupMean::Arithmetic => "arithmetic",
            GroupMean::Geometric => "geometric",
        }
    }
}
