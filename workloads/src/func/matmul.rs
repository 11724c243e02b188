//! The `matmul` function: C = A x B for n x n matrices of `f64` generated from a seed.
//!
//! Request: `n=N [seed=S]` (N in 1..=512). Entries are `k / 1024` with integer
//! `k in -1024..=1024` drawn from [`Rng`] (A first, row-major, then B), so every product and
//! partial sum is exact in `f64` and the result does not depend on the summation order. The
//! three matrices live in the heap (3 x 8 x N^2 bytes). Answer:
//! `{"n":N,"seed":S,"trace":T,"sum":U,"fnv64":"<FNV-1a-64 of C's little-endian bytes>"}`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::util::{fnv1a64, param, Rng};

/// Largest accepted `n`.
pub const MAX_N: usize = 512;

/// Why the function failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatmulError {
    /// A parameter is missing or out of range.
    #[error("bad request: {0} (expected `n=N [seed=S]`, 1 <= N <= 512)")]
    Bad(&'static str),
}

/// The two input matrices of `(n, seed)`.
pub fn inputs(n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = Rng::derive(seed, "matmul");
    let mut gen = || {
        (0..n * n)
            .map(|_| (rng.range(0, 2048) as f64 - 1024.0) / 1024.0)
            .collect::<Vec<_>>()
    };
    let a = gen();
    let b = gen();
    (a, b)
}

/// Blocked i-k-j multiplication.
pub fn multiply(n: usize, a: &[f64], b: &[f64], c: &mut Vec<f64>) {
    const BLK: usize = 64;
    c.clear();
    c.resize(n * n, 0.0);
    for ii in (0..n).step_by(BLK) {
        for kk in (0..n).step_by(BLK) {
            for i in ii..(ii + BLK).min(n) {
                for k in kk..(kk + BLK).min(n) {
                    let aik = a[i * n + k];
                    let row = &b[k * n..k * n + n];
                    for (cij, bkj) in c[i * n..i * n + n].iter_mut().zip(row) {
                        *cij += aik * bkj;
                    }
                }
            }
        }
    }
}

/// Answer line for result `c`.
pub fn answer(n: usize, seed: u64, c: &[f64]) -> String {
    let trace: f64 = (0..n).map(|i| c[i * n + i]).sum();
    let sum: f64 = c.iter().sum();
    let bytes: Vec<u8> = c.iter().flat_map(|v| v.to_le_bytes()).collect();
    format!(
        "{{\"n\":{n},\"seed\":{seed},\"trace\":{trace},\"sum\":{sum},\"fnv64\":\"{:016x}\"}}",
        fnv1a64(&bytes)
    )
}

/// Run the function.
pub fn run(request: &str) -> Result<String, MatmulError> {
    let n: usize = param(request, "n")
        .ok_or(MatmulError::Bad("missing n"))?
        .parse()
        .map_err(|_| MatmulError::Bad("n must be a number"))?;
    if n == 0 || n > MAX_N {
        return Err(MatmulError::Bad("n out of range"));
    }
    let seed: u64 = match param(request, "seed") {
        None => 1,
        Some(s) => s
            .parse()
            .map_err(|_| MatmulError::Bad("seed must be a number"))?,
    };
    let (a, b) = inputs(n, seed);
    let mut c = Vec::new();
    multiply(n, &a, &b, &mut c);
    Ok(answer(n, seed, &c))
}
