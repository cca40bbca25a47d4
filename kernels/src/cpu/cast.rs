//! Conversions between f32 and the 16-bit float types, in parallel chunks. Every op on 16-bit
//! data widens its inputs and narrows its output (DESIGN.md §2), so these run several times per
//! op; a serial per-element pass through f64 was 16% of a `--dtype bf16` training step.
//! Narrowing rounds to nearest even from the f32 bits (the `half` crate's f32 conversions). The
//! f64 route it replaces rounded some values down that lie just above a tie: `half`'s
//! `bf16::from_f64` misses the sticky bits below the round bit there (7.453126 gave 0x40ee, not
//! 0x40ef).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `dst = f32(src)`.
pub fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// `dst = f32(src)`.
pub fn widen_f16(src: &[f16], dst: &mut [f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// `dst = bf16(src)`, rounded to nearest even.
pub fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.convert_from_f32_slice(s));
}

/// `dst = f16(src)`, rounded to nearest even.
pub fn narrow_f16(src: &[f32], dst: &mut [f16]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.convert_from_f32_slice(s));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-to-nearest-even of an f32 to bf16 from its bits (finite values and infinities).
    fn rne_bf16(x: f32) -> u16 {
        let b = x.to_bits();
        let (hi, lo) = (b >> 16, b & 0xffff);
        (hi + u32::from(lo > 0x8000 || (lo == 0x8000 && hi & 1 == 1))) as u16
    }

    /// The chunked conversions round to nearest even from the f32 bits, on values across the
    /// range: ties, just past ties, subnormals, overflow to infinity, NaN; widening is exact.
    #[test]
    fn conversions_match_the_elementwise_ones() {
        let mut v: Vec<f32> = (0..100_000)
            .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 12 - 6))
            .collect();
        v.extend([
            7.453_126,
            1.0 + 1.0 / 256.0,
            65520.0,
            1e-40,
            f32::INFINITY,
            -0.0,
            3.4e38,
        ]);
        let mut b = vec![bf16::ZERO; v.len()];
        narrow_bf16(&v, &mut b);
        let mut h = vec![f16::ZERO; v.len()];
        narrow_f16(&v, &mut h);
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(b[i].to_bits(), rne_bf16(x), "{x}");
            assert_eq!(h[i].to_bits(), f16::from_f32(x).to_bits(), "{x}");
        }
        // Just above a tie rounds up; an exact tie goes to even.
        assert_eq!(
            b[v.iter().position(|&x| x == 7.453_126).unwrap_or(0)].to_bits(),
            0x40ef
        );
        let mut t = [bf16::ZERO; 2];
        narrow_bf16(
            &[f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)],
            &mut t,
        );
        assert_eq!((t[0].to_bits(), t[1].to_bits()), (0x3f80, 0x3f82));
        let (mut wb, mut wh) = (vec![0f32; v.len()], vec![0f32; v.len()]);
        widen_bf16(&b, &mut wb);
        widen_f16(&h, &mut wh);
        for i in 0..v.len() {
            assert_eq!(wb[i].to_bits(), (b[i].to_f64() as f32).to_bits());
            assert_eq!(wh[i].to_bits(), (h[i].to_f64() as f32).to_bits());
        }
        let mut nan = [bf16::ZERO];
        narrow_bf16(&[f32::NAN], &mut nan);
        assert!(nan[0].is_nan());
    }
}
