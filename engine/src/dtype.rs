use crate::storage::CpuData;
use half::{bf16, f16};

/// Element types. Reductions and softmax accumulate in at least f32 whatever the storage type;
/// BF16/F16 tensors compute in F32 (DESIGN.md §2). A result is 16-bit only when every float
/// input is; beside an f32 input it is f32 (PyTorch's promotion), which is how a model with
/// 16-bit weights runs under autocast: f32 activations, each product with a 16-bit weight
/// rounding its f32 operand once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// CPU only; the dtype of finite-difference gradient checks.
    F64,
    BF16,
    F16,
    /// Token ids and indices; never differentiable.
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn is_float(self) -> bool {
        self != DType::U32
    }
    /// 16-bit storage types that compute in f32.
    pub fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }
}

/// A Rust type that can be a tensor element on the host.
pub trait Elem: Copy + Send + Sync + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn wrap(v: Vec<Self>) -> CpuData;
    fn view(d: &CpuData) -> Option<&[Self]>;
    /// The vector itself, if `d` holds this type (no copy).
    fn take(d: CpuData) -> Option<Vec<Self>>;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! elem {
    ($t:ty, $variant:ident, $from:expr, $to:expr) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn wrap(v: Vec<Self>) -> CpuData {
                CpuData::$variant(v)
            }
            fn view(d: &CpuData) -> Option<&[Self]> {
                match d {
                    CpuData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn take(d: CpuData) -> Option<Vec<Self>> {
                match d {
                    CpuData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
        }
    };
}

elem!(f32, F32, |x| x as f32, |x: f32| x as f64);
elem!(f64, F64, |x| x, |x| x);
elem!(
    bf16,
    BF16,
    |x| bf16::from_f32(f64_to_f32_odd(x)),
    |x: bf16| x.to_f64()
);
elem!(f16, F16, |x| f16::from_f32(f64_to_f32_odd(x)), |x: f16| x
    .to_f64());
elem!(u32, U32, |x| x as u32, |x: u32| x as f64);

/// `x` rounded to f32 by round-to-odd: truncated toward zero, with the last bit set when
/// inexact. Rounding that to a 16-bit format (nearest, ties to even) gives the correctly
/// rounded 16-bit value of `x`, since f32 keeps more than two bits beyond either 16-bit
/// mantissa. `half`'s own f64 conversions drop the low 32 bits of the f64 first, losing the
/// sticky bits: values just above a tie rounded down (7.453126 gave bf16 0x40ee, not 0x40ef).
fn f64_to_f32_odd(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() || r as f64 == x {
        return r;
    }
    // `r` is the nearest f32; step back toward zero when it rounded away from zero.
    let t = if (r as f64).abs() > x.abs() {
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    };
    f32::from_bits(t.to_bits() | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 to 16 bits rounds once, to nearest even: just above a tie (in f32 and beyond f32's
    /// precision) rounds up, an exact tie goes to even, and specials survive.
    #[test]
    fn sixteen_bit_values_from_f64_round_correctly() {
        let b = |x: f64| <bf16 as Elem>::from_f64(x).to_bits();
        assert_eq!(b(7.453_126_f32 as f64), 0x40ef);
        // 1 + 2^-8 is a bf16 tie (to 1.0); 2^-40 more must round up, though f32 cannot hold it.
        assert_eq!(b(1.0 + 2f64.powi(-8)), 0x3f80);
        assert_eq!(b(1.0 + 2f64.powi(-8) + 2f64.powi(-40)), 0x3f81);
        assert_eq!(b(-(1.0 + 2f64.powi(-8) + 2f64.powi(-40))), 0xbf81);
        assert_eq!(b(1e300), 0x7f80);
        assert!(<bf16 as Elem>::from_f64(f64::NAN).is_nan());
        let h = |x: f64| <f16 as Elem>::from_f64(x).to_bits();
        // f16: 1 + 2^-11 ties to 1.0; a hair above rounds up; 65520 overflows to infinity.
        assert_eq!(h(1.0 + 2f64.powi(-11)), 0x3c00);
        assert_eq!(h(1.0 + 2f64.powi(-11) + 2f64.powi(-45)), 0x3c01);
        assert_eq!(h(65520.0), 0x7c00);
        assert_eq!(h(1e-9), 0x0000);
        // Every f32 value converts as from f32 directly.
        for i in 0..20_000u32 {
            let x = f32::from_bits(0x3000_0000 + i * 104_729);
            assert_eq!(b(x as f64), bf16::from_f32(x).to_bits(), "{x}");
            assert_eq!(h(x as f64), f16::from_f32(x).to_bits(), "{x}");
        }
    }
}
