//! The kscope guest agent's logic (host-testable): what a clone does when it learns that it is
//! a clone (SIGCLONE, in the spirit of VMGenID).
//!
//! The kernel already reseeds its RNG from the host's seed and drops requests in flight; the
//! agent adds what is policy rather than mechanism:
//! - mixes more entropy into the RNG (the host seed, the clone's id and generation, the time
//!   since boot and the RNG's own output, hashed together), so that two clones never share a
//!   random stream even if the host were to hand out the same seed twice;
//! - derives and applies the clone's identity (host name from the clone id when the VMM gave
//!   none; MAC and IPv4 address from the VMM);
//! - drops requests in flight (answers to them would reach nobody);
//! - logs one line on the console.
//!
//! Workloads keep their warm caches and may register their own SIGCLONE hook (`ulib::on_clone`).
#![cfg_attr(not(test), no_std)]

use kscope_guest::abi::boot::Identity;
use kscope_guest::abi::syscall::CloneInfo;

/// A 64-bit FNV-1a-style mix, folded into a SplitMix64 finaliser: a cheap, well-distributed
/// hash for combining entropy sources (not a cryptographic primitive: the kernel's ChaCha20
/// RNG does the cryptography, this only widens its input).
pub fn mix64(state: u64, data: &[u8]) -> u64 {
    let mut h = state ^ 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64 bytes the agent feeds to `reseed` after a clone: a mix of the host seed, the clone's
/// identity, a timestamp and fresh RNG output.
pub fn reseed_material(info: &CloneInfo, now_ns: u64, rng_out: &[u8; 32]) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&info.seed);
    let mut h = mix64(info.generation, &info.clone_id.to_le_bytes());
    h = mix64(h, &now_ns.to_le_bytes());
    for (i, chunk) in out[32..].chunks_mut(8).enumerate() {
        h = mix64(h ^ i as u64, rng_out);
        h = mix64(h, &info.seed);
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    out
}

/// The identity a clone applies: the VMM's, with a host name derived from the clone id when
/// the VMM gave none (`clone-<id>`).
pub fn clone_identity(info: &CloneInfo) -> Identity {
    let mut id = info.identity;
    if id.hostname[0] == 0 {
        let mut name = [0u8; 32];
        let prefix = b"clone-";
        name[..prefix.len()].copy_from_slice(prefix);
        let n = write_decimal(&mut name[prefix.len()..], info.clone_id);
        debug_assert!(prefix.len() + n < 32);
        id.hostname = name;
    }
    id
}

/// Write `v` in decimal at the start of `out`; returns the number of digits written.
pub fn write_decimal(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let n = n.min(out.len());
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(clone_id: u64, seed: u8) -> CloneInfo {
        CloneInfo {
            generation: 3,
            clone_id,
            seed: [seed; 32],
            identity: Identity::default(),
        }
    }

    #[test]
    fn hostname_derives_from_clone_id_when_missing() {
        let id = clone_identity(&info(42, 1));
        assert_eq!(&id.hostname[..9], b"clone-42\0");
        let mut given = info(7, 1);
        given.identity.hostname[..3].copy_from_slice(b"web");
        assert_eq!(&clone_identity(&given).hostname[..4], b"web\0");
    }

    #[test]
    fn reseed_material_differs_between_clones_even_with_equal_seeds() {
        let rng = [9u8; 32];
        let a = reseed_material(&info(1, 5), 1000, &rng);
        let b = reseed_material(&info(2, 5), 1000, &rng);
        assert_eq!(a[..32], b[..32], "host seed passes through");
        assert_ne!(a[32..], b[32..]);
        let c = reseed_material(&info(1, 5), 1001, &rng);
        assert_ne!(a[32..], c[32..]);
    }

    #[test]
    fn decimal() {
        let mut b = [0u8; 20];
        assert_eq!(write_decimal(&mut b, 0), 1);
        assert_eq!(&b[..1], b"0");
        assert_eq!(write_decimal(&mut b, 18_446_744_073_709_551_615), 20);
        assert_eq!(&b[..20], b"18446744073709551615");
    }
}
