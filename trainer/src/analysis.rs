//! Token-confidence analysis, the paper's Figure 1: in a sample's per-token probabilities,
//! isolated drops (Group A: one token with p below `drop_p` among confident neighbours) are
//! told apart from sustained low spans (Group B: `window` consecutive tokens whose mean p is
//! below `span_mean`). BFT's sample weight reacts to Group B, which marks missing knowledge;
//! DFT's token weights alone already discount Group A.

/// Thresholds of the two groups (DESIGN.md §5 defaults).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct AnalysisConfig {
    /// Group A: a token with p below this...
    pub drop_p: f64,
    /// ...inside a context of this many tokens (itself included, centred on it)...
    pub context: usize,
    /// ...whose other tokens average at least this, none of them below `drop_p` (one drop).
    pub confident_p: f64,
    /// Group B: windows of this many tokens...
    pub window: usize,
    /// ...whose mean p is below this.
    pub span_mean: f64,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            drop_p: 0.1,
            context: 10,
            confident_p: 0.5,
            window: 10,
            span_mean: 0.15,
        }
    }
}

/// The groups found in one sample: target-token indices.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Groups {
    /// Group A: isolated low-confidence tokens.
    pub isolated: Vec<usize>,
    /// Group B: maximal spans `[start, end)` covered by low-mean windows.
    pub spans: Vec<(usize, usize)>,
}

impl Groups {
    pub fn span_tokens(&self) -> usize {
        self.spans.iter().map(|(a, b)| b - a).sum()
    }

    /// Whether target token `i` lies in a Group B span.
    pub fn in_span(&self, i: usize) -> bool {
        self.spans.iter().any(|&(a, b)| a <= i && i < b)
    }
}

/// Finds both groups in the probabilities of a sample's targets, in order.
pub fn find_groups(p: &[f64], cfg: &AnalysisConfig) -> Groups {
    let n = p.len();
    let mut g = Groups::default();
    // Group B: every window with a low mean; overlapping windows merge into one span.
    if cfg.window > 0 && n >= cfg.window {
        let mut sum: f64 = p[..cfg.window].iter().sum();
        for start in 0..=n - cfg.window {
            if start > 0 {
                sum += p[start + cfg.window - 1] - p[start - 1];
            }
            if sum / (cfg.window as f64) < cfg.span_mean {
                let end = start + cfg.window;
                match g.spans.last_mut() {
                    Some(last) if last.1 >= start => last.1 = end,
                    _ => g.spans.push((start, end)),
                }
            }
        }
    }
    // Group A: a full context around the token, every other token in it confident.
    let half = cfg.context / 2;
    for i in 0..n {
        if p[i] >= cfg.drop_p || g.in_span(i) || i < half || i + cfg.context - half > n {
            continue;
        }
        let lo = i - half;
        let hi = lo + cfg.context;
        let others = || (lo..hi).filter(|&j| j != i).map(|j| p[j]);
        let mean = others().sum::<f64>() / (cfg.context - 1).max(1) as f64;
        if mean >= cfg.confident_p && others().all(|q| q >= cfg.drop_p) {
            g.isolated.push(i);
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_isolated_drop_is_group_a_and_a_low_run_is_group_b() {
        let cfg = AnalysisConfig::default();
        // 30 confident tokens, one drop at 12, a low run over 20..30 (mean 0.05).
        let mut p = vec![0.9; 40];
        p[12] = 0.02;
        for x in &mut p[20..30] {
            *x = 0.05;
        }
        let g = find_groups(&p, &cfg);
        assert_eq!(g.isolated, vec![12]);
        // Windows overlapping the run by 9 tokens still average (9 * 0.05 + 0.9) / 10 = 0.135.
        assert_eq!(g.spans, vec![(19, 31)]);
        assert_eq!(g.span_tokens(), 12);
        // The span's own tokens are not isolated drops.
        assert!(g.in_span(25) && !g.isolated.contains(&25));
    }

    #[test]
    fn windows_merge_and_edges_count() {
        let cfg = AnalysisConfig::default();
        // A low run of 14 tokens at the start: windows at 0..=4 qualify (mean < 0.15)
        // while they hold at most one confident token.
        let mut p = vec![0.0; 14];
        p.extend(vec![1.0; 10]);
        let g = find_groups(&p, &cfg);
        // Window starting at s holds 14 - s zeros; mean < 0.15 while (s - 4) / 10 < 0.15,
        // i.e. s <= 5: spans merge to [0, 15).
        assert_eq!(g.spans, vec![(0, 15)]);
        assert!(g.isolated.is_empty());
        // A drop next to another drop is not isolated; next to a merely weak one it is, while
        // its neighbours average at least 0.5.
        let mut q = vec![0.9; 20];
        q[8] = 0.05;
        q[10] = 0.3;
        assert_eq!(find_groups(&q, &cfg).isolated, vec![8]);
        q[10] = 0.05;
        assert!(find_groups(&q, &cfg).isolated.is_empty());
        let mut r = vec![0.45; 20];
        r[8] = 0.05;
        assert!(find_groups(&r, &cfg).isolated.is_empty());
        // Too short for any window or context.
        assert_eq!(find_groups(&[0.01; 5], &cfg), Groups::default());
    }
}
