//! Small shared helpers: a seeded PRNG, a hasher for `hashbrown`, digests and formatting.

use alloc::string::String;
use core::fmt::Write as _;
use core::hash::{BuildHasherDefault, Hasher};

/// Deterministic PRNG (SplitMix64): every data file and request mix is derived from seeds,
/// never from ambient randomness, so the host can recompute everything the guest serves.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6a09_e667_f3bc_c909)
    }

    /// A generator derived from a seed and a label (independent streams per file).
    pub fn derive(seed: u64, label: &str) -> Self {
        Rng::new(seed ^ fnv1a64(label.as_bytes()).rotate_left(17))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        let span = hi - lo + 1;
        lo + ((self.next_u64() as u128 * span as u128) >> 64) as u64
    }

    /// Uniform float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Index drawn from a Zipf-like distribution over `0..n` (exponent ~1), by inverse CDF of
    /// a continuous approximation: small indices are hot.
    pub fn zipf(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let u = self.unit();
        // x = (n+1)^u - 1 has density ~ 1/(1+x) on [0, n].
        let x = libm_pow((n + 1) as f64, u) - 1.0;
        (x as u64).min(n - 1)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `base^e` for `base > 0` without libm: exp(e * ln(base)) with a few series terms (exact
/// enough to shape a request distribution).
fn libm_pow(base: f64, e: f64) -> f64 {
    // ln(base) by bit decomposition: base = m * 2^k with m in [1, 2).
    let bits = base.to_bits();
    let k = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let mut s = 0.0;
    let mut p = t;
    let mut i = 1.0;
    while i < 40.0 {
        s += p / i;
        p *= t2;
        i += 2.0;
    }
    let ln = 2.0 * s + k as f64 * core::f64::consts::LN_2;
    exp(e * ln)
}

fn exp(x: f64) -> f64 {
    // Range reduction: x = n ln2 + r, |r| <= ln2/2; Taylor series for e^r.
    let n = (x / core::f64::consts::LN_2 + 0.5) as i64 - if x < 0.0 { 1 } else { 0 };
    let r = x - n as f64 * core::f64::consts::LN_2;
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..25 {
        term *= r / i as f64;
        sum += term;
    }
    sum * f64::from_bits(((n + 1023).clamp(1, 2046) as u64) << 52)
}

/// FNV-1a, 64 bits: the digest workloads report for large outputs.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hasher for `hashbrown` maps in the guest (FxHash-style multiply-rotate).
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// A `hashbrown` map with [`FxHasher`].
pub type FxHashMap<K, V> = hashbrown::HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Format an amount in hundredths (cents) as `-123.45`.
pub fn fmt_cents(out: &mut String, cents: i64) {
    let sign = if cents < 0 { "-" } else { "" };
    let a = cents.unsigned_abs();
    let _ = write!(out, "{sign}{}.{:02}", a / 100, a % 100);
}

/// Format a fixed-point value with `scale` decimal digits, rounded half away from zero to two
/// decimals (`v / 10^scale`).
pub fn fmt_fixed2(out: &mut String, v: i128, scale: u32) {
    let neg = v < 0;
    let a = v.unsigned_abs();
    let div = 10u128.pow(scale.saturating_sub(2));
    let hundredths = if scale >= 2 {
        (a + div / 2) / div
    } else {
        a * 10u128.pow(2 - scale)
    };
    let sign = if neg && hundredths != 0 { "-" } else { "" };
    let _ = write!(out, "{sign}{}.{:02}", hundredths / 100, hundredths % 100);
}

/// Value of `key` in a `k=v k=v` or `k=v&k=v` parameter string.
pub fn param<'a>(params: &'a str, key: &str) -> Option<&'a str> {
    params
        .split(|c: char| c == '&' || c.is_ascii_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Append `bytes` as lowercase hex.
pub fn hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            let x = a.range(3, 9);
            assert_eq!(x, b.range(3, 9));
            assert!((3..=9).contains(&x));
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn zipf_prefers_small_indices() {
        let mut r = Rng::new(1);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[r.zipf(10) as usize] += 1;
        }
        assert!(counts[0] > counts[5] && counts[1] > counts[9], "{counts:?}");
        assert!(counts.iter().all(|&c| c > 0));
    }

    #[test]
    fn pow_and_formatting() {
        assert!((libm_pow(10.0, 0.5) - 3.162_277_66).abs() < 1e-6);
        assert!((libm_pow(1000.0, 1.0) - 1000.0).abs() < 1e-6);
        let mut s = String::new();
        fmt_cents(&mut s, -12345);
        s.push(' ');
        fmt_cents(&mut s, 7);
        s.push(' ');
        fmt_fixed2(&mut s, 123_455, 4); // 12.3455 -> 12.35
        s.push(' ');
        fmt_fixed2(&mut s, -5, 4);
        assert_eq!(s, "-123.45 0.07 12.35 0.00");
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(param("a=1 b=xy&c=3", "b"), Some("xy"));
        assert_eq!(param("a=1", "z"), None);
    }
}
