//! Dequantisation of the GGML block formats GGUF files use, to f32.
//!
//! Each format stores fixed-size blocks of elements along a row; layouts follow ggml's
//! reference (`ggml-quants.c`): `d`/`dmin` scales are f16, little-endian throughout.

use half::f16;

/// GGML tensor types this reader supports, by their numeric id in GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// Bytes holding `n` elements (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        n.is_multiple_of(per)
            .then(|| (n / per).checked_mul(bytes))
            .flatten()
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `data` (exactly `ty.bytes_for(out.len())` bytes) into `out`.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per, bytes) = ty.block();
    for (blk, o) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
        match ty {
            GgmlType::F32 => o[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => o[0] = f16_at(blk, 0),
            GgmlType::BF16 => o[0] = half::bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q4_0 => {
                let d = f16_at(blk, 0);
                for i in 0..16 {
                    o[i] = ((blk[2 + i] & 0xF) as f32 - 8.0) * d;
                    o[i + 16] = ((blk[2 + i] >> 4) as f32 - 8.0) * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for i in 0..16 {
                    o[i] = (blk[4 + i] & 0xF) as f32 * d + m;
                    o[i + 16] = (blk[4 + i] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(blk, 0);
                for i in 0..32 {
                    o[i] = blk[2 + i] as i8 as f32 * d;
                }
            }
            GgmlType::Q4K => q4k(blk, o),
            GgmlType::Q6K => q6k(blk, o),
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block's 12 packed scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Q4_K: 256 elements as 8 sub-blocks of 32, each with a 6-bit scale and min.
/// Layout: d (f16), dmin (f16), scales[12], qs[128].
fn q4k(blk: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let (scales, qs) = (&blk[4..16], &blk[16..144]);
    for (k, j) in (0..256).step_by(64).enumerate() {
        let (s1, m1) = scale_min_k4(2 * k, scales);
        let (s2, m2) = scale_min_k4(2 * k + 1, scales);
        let q = &qs[32 * k..32 * k + 32];
        for l in 0..32 {
            o[j + l] = d * s1 * (q[l] & 0xF) as f32 - dmin * m1;
            o[j + 32 + l] = d * s2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// Q6_K: 256 elements as 16 sub-blocks of 16 with int8 scales; 4 low bits in `ql`, 2 high bits
/// in `qh`. Layout: ql[128], qh[64], scales[16] (i8), d (f16).
fn q6k(blk: &[u8], o: &mut [f32]) {
    let (ql, qh, sc, d) = (
        &blk[..128],
        &blk[128..192],
        &blk[192..208],
        f16_at(blk, 208),
    );
    for half in 0..2 {
        let (ql, qh, sc, o) = (
            &ql[64 * half..],
            &qh[32 * half..],
            &sc[8 * half..],
            &mut o[128 * half..],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_block_formats_by_hand() {
        // Q8_0: d = 0.5, q = -3 .. 28
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let mut o = [0.0; 32];
        dequantize(GgmlType::Q8_0, &b, &mut o);
        assert_eq!((o[0], o[31]), (-1.5, 14.0));
        // Q4_1: d = 2, m = -1; byte i holds element i (low nibble) and i + 16 (high nibble).
        let mut b = [
            f16::from_f32(2.0).to_le_bytes(),
            f16::from_f32(-1.0).to_le_bytes(),
        ]
        .concat();
        b.extend((0..16).map(|i| (i as u8) | ((15 - i as u8) << 4)));
        dequantize(GgmlType::Q4_1, &b, &mut o);
        assert_eq!((o[0], o[1], o[16], o[31]), (-1.0, 1.0, 29.0, -1.0));
        // Q4_0: d = 1, values q - 8.
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend([0x80u8; 16]);
        dequantize(GgmlType::Q4_0, &b, &mut o);
        assert_eq!((o[0], o[16]), (-8.0, 0.0));
    }
}

#[cfg(test)]
mod k_quant_tests {
    use super::*;

    /// Vectors from llama.cpp's `gguf` package (`model/fixtures/make_quant_vectors.py`).
    #[test]
    fn k_quants_match_llama_cpp_reference() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../fixtures/quant_vectors.json")).unwrap();
        for (name, ty) in [("Q4_K", GgmlType::Q4K), ("Q6_K", GgmlType::Q6K)] {
            let hex = v[name]["bytes"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f64> = v[name]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let mut got = vec![0.0f32; want.len()];
            dequantize(ty, &bytes, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "{name}[{i}]: {g} vs {w}"
                );
            }
        }
    }
}
