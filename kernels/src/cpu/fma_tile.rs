//! Small f32 products on the calling thread with AVX2 and FMA: the tiles of flash attention
//! (64 x 64 x 64 blocks of Q.K^T, P.V and their gradients) on CPUs that prefer `fma_gemm`.
//!
//! On a Zen 3 EPYC the `gemm` crate spent most of the attention's time on these tiles (its
//! call overhead and packing are a large share of a 64-deep product). Here nothing of A is
//! packed: the micro-kernel broadcasts A's values where they lie (six row pointers, or one
//! column of a transposed A), and B is read in place when its rows are whole 16-column
//! panels; a transposed or ragged B is first laid out k-major in a kept buffer (for
//! `Q.K^T`: one 8 x 8 register transpose per 64 values). The 6 x 16 tile of C lives in 12 ymm
//! registers, as in `fma_gemm`.

use super::fma_gemm::{MR, NR, available, store_tile, transpose8, with_floats};
use core::arch::x86_64::*;
use std::cell::Cell;

thread_local! {
    /// This thread's k-major copy of B (`k x n` rounded up to 16 columns), kept between calls.
    static B_ROWS: Cell<Vec<super::Line>> = const { Cell::new(Vec::new()) };
}

/// `c (m, n) = beta * op(a) . op(b)`, or `c += ..` when `accumulate`, for contiguous `a`
/// (`(m, k)`, `(k, m)` if `ta`) and `b` (`(k, n)`, `(n, k)` if `tb`), on the calling thread.
/// Returns false, writing nothing, when the CPU lacks AVX2 or FMA.
///
/// # Panics
/// If a buffer is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_product(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: &mut [f32],
    accumulate: bool,
    beta: f32,
) -> bool {
    if !available() {
        return false;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "tile_product: buffer too short"
    );
    // Empty shapes need no case of their own: no tile for m or n = 0, zero tiles for k = 0.
    let mut run = |rows: &[f32], ldb: usize| {
        // SAFETY: `available()` found AVX2 and FMA; `a` holds m * k values (asserted), `rows`
        // k rows of `ldb >= n` values with every 16-column panel whole (ldb is n when n is
        // a multiple of 16, else n rounded up), `c` m * n values.
        unsafe {
            if ta {
                tiles::<true>((m, n, k), a, rows, ldb, c, accumulate, beta)
            } else {
                tiles::<false>((m, n, k), a, rows, ldb, c, accumulate, beta)
            }
        }
    };
    if !tb && n.is_multiple_of(NR) {
        run(b, n);
    } else {
        let ldb = n.next_multiple_of(NR);
        with_floats(&B_ROWS, k * ldb, |rows| {
            // SAFETY: as above; `rows` holds k * ldb values.
            unsafe { k_major(b, tb, (n, k), ldb, rows) };
            run(rows, ldb);
        });
    }
    true
}

/// `rows (k, ldb)` = `op(b) (k, n)` with zeros in columns `n..ldb`.
///
/// # Safety
/// The CPU must have AVX2; `b` holds `n * k` values, `rows` `k * ldb`, `ldb >= n`.
#[target_feature(enable = "avx2,fma")]
unsafe fn k_major(b: &[f32], tb: bool, (n, k): (usize, usize), ldb: usize, rows: &mut [f32]) {
    let rows = &mut rows[..k * ldb];
    if !tb {
        for (dst, src) in rows.chunks_exact_mut(ldb).zip(b.chunks_exact(n)) {
            dst[..n].copy_from_slice(src);
            dst[n..].fill(0.0);
        }
        return;
    }
    // b is (n, k): column j of op(b) is row j of b. Whole 8 x 8 blocks by register transposes.
    let (n8, k8) = (n - n % 8, k - k % 8);
    for j in (0..n8).step_by(8) {
        for p in (0..k8).step_by(8) {
            // SAFETY: rows j..j + 8 of b hold k values each, p + 8 <= k.
            let r: [__m256; 8] = std::array::from_fn(|i| unsafe {
                _mm256_loadu_ps(b.as_ptr().add((j + i) * k + p))
            });
            for (i, col) in transpose8(r).into_iter().enumerate() {
                // SAFETY: row p + i < k of `rows`, columns j..j + 8 <= n <= ldb.
                unsafe { _mm256_storeu_ps(rows.as_mut_ptr().add((p + i) * ldb + j), col) };
            }
        }
        for p in k8..k {
            for i in 0..8 {
                rows[p * ldb + j + i] = b[(j + i) * k + p];
            }
        }
    }
    for (p, row) in rows.chunks_exact_mut(ldb).enumerate() {
        for (jj, x) in row[n8..].iter_mut().enumerate() {
            let j = n8 + jj;
            *x = if j < n { b[j * k + p] } else { 0.0 };
        }
    }
}

/// The tiles of `c`: A's values broadcast in place (`TA`: `a` is `(k, m)`), B's rows read from
/// `rows (k, ldb)`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` holds `m * k` values, `rows` `k * ldb` with
/// `ldb >= n.next_multiple_of(16)`, `c` `m * n`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<const TA: bool>(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    rows: &[f32],
    ldb: usize,
    c: &mut [f32],
    accumulate: bool,
    beta: f32,
) {
    let (a, b, c) = (a.as_ptr(), rows.as_ptr(), c.as_mut_ptr());
    for r0 in (0..m).step_by(MR) {
        let live = MR.min(m - r0);
        // Where row r's k values start (rows past m repeat the last one; they are not
        // stored), and how far apart consecutive k values are.
        let (starts, step): ([usize; MR], usize) = if TA {
            (std::array::from_fn(|r| r0 + r.min(live - 1)), m)
        } else {
            (std::array::from_fn(|r| (r0 + r.min(live - 1)) * k), 1)
        };
        for j0 in (0..n).step_by(NR) {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for p in 0..k {
                // SAFETY: p < k and j0 + 16 <= ldb: inside `rows`; starts[r] + p * step
                // addresses A's (row, p) value, inside `a`.
                unsafe {
                    let b0 = _mm256_loadu_ps(b.add(p * ldb + j0));
                    let b1 = _mm256_loadu_ps(b.add(p * ldb + j0 + 8));
                    for (acc_r, &s) in acc.iter_mut().zip(&starts) {
                        let x = _mm256_broadcast_ss(&*a.add(s + p * step));
                        acc_r[0] = _mm256_fmadd_ps(x, b0, acc_r[0]);
                        acc_r[1] = _mm256_fmadd_ps(x, b1, acc_r[1]);
                    }
                }
            }
            // SAFETY: the tile at row r0, column j0 (live x min(16, n - j0)) lies inside c
            // (m x n, row stride n), which this call alone writes.
            unsafe {
                let tile = c.add(r0 * n + j0);
                store_tile(&acc, tile, n, (live, NR.min(n - j0)), accumulate, beta)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::{GemmDims, Operand, matmul_reference};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + 1) * (2 * seed + 1) * 2_654_435_761) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Every transpose, m off the 6-row tile, n on and off the 16-column panel (B read in place
    /// and copied), k = 0, 1 and past 8, accumulation and a scale, against the f64 product.
    #[test]
    fn matches_the_f64_reference() {
        if !available() {
            eprintln!("AVX2 + FMA not on this CPU: nothing to run");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (6, 16, 8),
            (7, 17, 9),
            (64, 64, 64),
            (13, 32, 3),
            (5, 40, 70),
            (3, 20, 0),
        ] {
            for (ta, tb) in [(false, true), (false, false), (true, false), (true, true)] {
                for (accumulate, beta) in [(false, 0.125f32), (true, 1.0)] {
                    let (a, b) = (values(m * k, m + n), values(k * n, k + 3));
                    let init = values(m * n, 7);
                    let mut got = init.clone();
                    assert!(tile_product(
                        (m, n, k),
                        &a,
                        ta,
                        &b,
                        tb,
                        &mut got,
                        accumulate,
                        beta
                    ));
                    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                    let (a64, b64) = (wide(&a), wide(&b));
                    let mut want = vec![0.0f64; m * n];
                    let op = |data, trans| Operand {
                        data,
                        trans,
                        batch_stride: 0,
                    };
                    let dims = GemmDims { batch: 1, m, n, k };
                    matmul_reference(dims, op(&a64[..], ta), op(&b64[..], tb), &mut want);
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        let w = w * beta as f64 + if accumulate { init[i] as f64 } else { 0.0 };
                        assert!(
                            (g as f64 - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()),
                            "({m},{n},{k}) ta {ta} tb {tb} acc {accumulate} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
