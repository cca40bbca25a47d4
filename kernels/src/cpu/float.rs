use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

/// The compute types of the CPU kernels: f32 for training, f64 for gradient checks.
pub trait Float:
    num_traits::Float
    + bytemuck::Pod
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `v[i] = exp(v[i])` over a slice. f32 uses a branch-free polynomial the compiler
    /// vectorises (relative error below 2e-7); f64 stays exact for gradient checks.
    fn exp_in_place(v: &mut [Self]);
    /// `exp(x)` for elementwise loops: f32 through the same vectorisable polynomial as
    /// `exp_in_place`, f64 exact.
    fn exp_fast(self) -> Self;
    /// The error function: f64 from `libm` (within 1 ulp, for gradient checks); f32 from a
    /// branch-free Chebyshev fit that vectorises (see `erf_f32`).
    fn erf(self) -> Self;
}

impl Float for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_in_place(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = exp_f32(*x));
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
}

/// exp(x) as `2^n * p(r)` with `x = n ln2 + r`, `|r| <= ln2 / 2`, and Cephes' degree-6
/// polynomial for `p`. No libm call and no branch, so loops over it vectorise. Inputs below
/// -87.3 give about 1e-38 rather than 0; callers that need an exact 0 (masked scores) set it.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to the nearest integer and leaves that integer in the low
    // mantissa bits, so n is read off the bits (integer SIMD) rather than by a float-to-int
    // cast, whose saturation semantics block vectorisation.
    const ROUND: f32 = 12_582_912.0;
    // The upper bound keeps 2^n finite (n <= 127); the lower keeps it normal (n >= -126).
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    // ln2 split in two so `n * ln2` is exact in the high part.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((ni + 127) as u32) << 23)
}

/// erf(x) from the Chebyshev fit of erfc in Numerical Recipes (fractional error of erfc below
/// 1.2e-7 in exact arithmetic; within 4e-7 absolute of libm in f32), the formula the WGSL
/// kernels use. Built on `exp_f32` with no
/// branch, so GELU's loop vectorises: libm's erff was 2.3 of 7.8 s of a MiniLM embedding run.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    (1.0 - t * exp_f32(poly)).copysign(x)
}

impl Float for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_in_place(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.exp());
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// The largest element (NaN ignored, as `f32::max` does; -inf for an empty slice), over 16
/// independent lanes: a single running max is a serial chain of dependent instructions, which
/// over a vocabulary-long row of logits costs more than the exps that follow. Max is exact, so
/// the result does not depend on the order.
#[inline]
pub fn max_of<T: Float>(v: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 16];
    let mut chunks = v.chunks_exact(16);
    for c in chunks.by_ref() {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(T::neg_infinity(), T::max);
    acc.iter().copied().fold(tail, T::max)
}

/// The sum over 16 independent lanes (so it vectorises), combined pairwise.
#[inline]
pub fn sum_of<T: Float>(v: &[T]) -> T {
    let mut acc = [T::zero(); 16];
    let mut chunks = v.chunks_exact(16);
    for c in chunks.by_ref() {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + chunks.remainder().iter().copied().sum::<T>()
}

/// Dot product with eight independent accumulators: a single running sum is a serial
/// dependency chain that the compiler may not reorder (no fast-math), so it would not vectorise.
#[inline]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::zero(); 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = T::zero();
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::erf_f32;
    #[test]
    fn erf_f32_is_within_4e7_of_libm() {
        let mut worst = 0.0f64;
        for i in -100_000..=100_000 {
            let x = i as f64 * 6e-5;
            let x = x as f32;
            let e = (erf_f32(x) as f64 - libm::erf(x as f64)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 4e-7, "worst absolute error {worst}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(-9.0), -1.0);
    }

    #[test]
    fn exp_f32_is_accurate_over_the_range_attention_uses() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -80.0 + 88.0 * i as f64 / 200_000.0;
            let got = super::exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "max relative error {worst:e}");
    }

    /// The lane-parallel reductions give the plain ones: max exactly (NaN ignored, -inf when
    /// empty) and sums within rounding, on every length around the 16 lanes.
    #[test]
    fn lane_reductions_match_the_plain_ones() {
        use super::{max_of, sum_of};
        for n in [0usize, 1, 15, 16, 17, 33, 1000] {
            let v: Vec<f64> = (0..n)
                .map(|i| ((i * 7919) % 1009) as f64 * 0.37 - 150.0)
                .collect();
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max_of(&v), max, "n={n}");
            let sum: f64 = v.iter().sum();
            assert!(
                (sum_of(&v) - sum).abs() <= 1e-9 * (1.0 + sum.abs()),
                "n={n}"
            );
        }
        let with_nan = [1.0f32, f32::NAN, 3.0, -2.0];
        assert_eq!(max_of(&with_nan), 3.0);
    }
}
