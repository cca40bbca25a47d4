use crate::storage::CpuData;
use half::{bf16, f16};

/// Element types. Reductions and softmax accumulate in at least f32 whatever the storage type;
/// BF16/F16 tensors are widened to F32 for compute and narrowed back (DESIGN.md §2).
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
elem!(bf16, BF16, bf16::from_f64, |x: bf16| x.to_f64());
elem!(f16, F16, f16::from_f64, |x: f16| x.to_f64());
elem!(u32, U32, |x| x as u32, |x: u32| x as f64);
