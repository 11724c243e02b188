//! The `aes` function: AES-128 in CTR mode over the first N KiB of `/data/aes/input.bin`.
//!
//! Request: `kib=N [key=<32 hex digits>] [nonce=<u64>]` (defaults: key `000102..0f`, nonce
//! 0). The initial counter block is the nonce big-endian in its first 8 bytes and zeros, and
//! is incremented as a 128-bit big-endian integer. The ciphertext is written into a heap
//! buffer (working set = input pages + output). Answer:
//! `{"kib":N,"bytes":B,"fnv64":"<FNV-1a-64 of the ciphertext>","head":"<first 16 bytes hex>"}`.
//!
//! The cipher is a 32-bit T-table implementation (tables computed at compile time).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::data::func::AES_INPUT_PATH;
use crate::files::{FileError, Files};
use crate::util::{fnv1a64, hex, param};

/// Why the function failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AesError {
    /// A parameter is missing or malformed.
    #[error("bad request: {0} (expected `kib=N [key=<32 hex>] [nonce=<u64>]`)")]
    Bad(&'static str),
    /// More KiB requested than the input has.
    #[error("kib={0} exceeds the input ({1} KiB)")]
    TooLarge(u64, u64),
    /// The input could not be read.
    #[error(transparent)]
    File(#[from] FileError),
}

const fn gmul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let hi = a & 0x80;
        a <<= 1;
        if hi != 0 {
            a ^= 0x1b;
        }
        b >>= 1;
    }
    p
}

const fn make_sbox() -> [u8; 256] {
    let mut s = [0u8; 256];
    let mut x = 0;
    while x < 256 {
        let mut inv = 0u8;
        if x != 0 {
            let mut y = 1;
            while y < 256 {
                if gmul(x as u8, y as u8) == 1 {
                    inv = y as u8;
                    break;
                }
                y += 1;
            }
        }
        let b = inv;
        s[x] = b ^ b.rotate_left(1) ^ b.rotate_left(2) ^ b.rotate_left(3) ^ b.rotate_left(4) ^ 0x63;
        x += 1;
    }
    s
}

const SBOX: [u8; 256] = make_sbox();

const fn make_te(rot: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut x = 0;
    while x < 256 {
        let s = SBOX[x];
        let w = ((gmul(s, 2) as u32) << 24)
            | ((s as u32) << 16)
            | ((s as u32) << 8)
            | gmul(s, 3) as u32;
        t[x] = w.rotate_right(rot);
        x += 1;
    }
    t
}

static TE0: [u32; 256] = make_te(0);
static TE1: [u32; 256] = make_te(8);
static TE2: [u32; 256] = make_te(16);
static TE3: [u32; 256] = make_te(24);

/// An expanded AES-128 key.
pub struct Aes128 {
    rk: [u32; 44],
}

impl Aes128 {
    /// Expand `key`.
    pub fn new(key: &[u8; 16]) -> Self {
        let mut rk = [0u32; 44];
        for i in 0..4 {
            rk[i] =
                u32::from_be_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]]);
        }
        let mut rcon = 1u8;
        for i in 4..44 {
            let mut t = rk[i - 1];
            if i % 4 == 0 {
                let b = t.rotate_left(8).to_be_bytes();
                t = u32::from_be_bytes([
                    SBOX[b[0] as usize],
                    SBOX[b[1] as usize],
                    SBOX[b[2] as usize],
                    SBOX[b[3] as usize],
                ]) ^ ((rcon as u32) << 24);
                rcon = gmul(rcon, 2);
            }
            rk[i] = rk[i - 4] ^ t;
        }
        Aes128 { rk }
    }

    /// Encrypt one block.
    pub fn encrypt_block(&self, block: &[u8; 16]) -> [u8; 16] {
        let w = |i: usize| {
            u32::from_be_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ])
        };
        let rk = &self.rk;
        let mut s = [w(0) ^ rk[0], w(1) ^ rk[1], w(2) ^ rk[2], w(3) ^ rk[3]];
        for round in 1..10 {
            let mut t = [0u32; 4];
            for (c, tc) in t.iter_mut().enumerate() {
                *tc = TE0[(s[c] >> 24) as usize]
                    ^ TE1[((s[(c + 1) % 4] >> 16) & 0xff) as usize]
                    ^ TE2[((s[(c + 2) % 4] >> 8) & 0xff) as usize]
                    ^ TE3[(s[(c + 3) % 4] & 0xff) as usize]
                    ^ rk[4 * round + c];
            }
            s = t;
        }
        let mut out = [0u8; 16];
        for c in 0..4 {
            let b = [
                SBOX[(s[c] >> 24) as usize],
                SBOX[((s[(c + 1) % 4] >> 16) & 0xff) as usize],
                SBOX[((s[(c + 2) % 4] >> 8) & 0xff) as usize],
                SBOX[(s[(c + 3) % 4] & 0xff) as usize],
            ];
            let v = u32::from_be_bytes(b) ^ rk[40 + c];
            out[4 * c..4 * c + 4].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    /// CTR-mode keystream XOR of `input` into `out` (resized to `input.len()`), starting at
    /// counter block `counter` (128-bit big-endian increment).
    pub fn ctr(&self, counter: [u8; 16], input: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(input.len());
        let mut ctr = u128::from_be_bytes(counter);
        for chunk in input.chunks(16) {
            let ks = self.encrypt_block(&ctr.to_be_bytes());
            out.extend(chunk.iter().zip(ks.iter()).map(|(a, b)| a ^ b));
            ctr = ctr.wrapping_add(1);
        }
    }
}

/// Parse 32 hex digits.
pub fn parse_key(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let mut k = [0u8; 16];
    for i in 0..16 {
        let d = |c: u8| (c as char).to_digit(16);
        k[i] = (d(b[2 * i])? * 16 + d(b[2 * i + 1])?) as u8;
    }
    Some(k)
}

/// Default key `000102...0f`.
pub const DEFAULT_KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Run the function; `out` is the reusable ciphertext buffer.
pub fn run<F: Files>(files: &mut F, request: &str, out: &mut Vec<u8>) -> Result<String, AesError> {
    let kib: u64 = param(request, "kib")
        .ok_or(AesError::Bad("missing kib"))?
        .parse()
        .map_err(|_| AesError::Bad("kib must be a number"))?;
    let key = match param(request, "key") {
        None => DEFAULT_KEY,
        Some(k) => parse_key(k).ok_or(AesError::Bad("key must be 32 hex digits"))?,
    };
    let nonce: u64 = match param(request, "nonce") {
        None => 0,
        Some(n) => n
            .parse()
            .map_err(|_| AesError::Bad("nonce must be a number"))?,
    };
    let input = files.map(AES_INPUT_PATH)?;
    let bytes = kib * 1024;
    if kib == 0 || bytes > input.len() as u64 {
        return Err(AesError::TooLarge(kib, input.len() as u64 / 1024));
    }
    let mut counter = [0u8; 16];
    counter[..8].copy_from_slice(&nonce.to_be_bytes());
    Aes128::new(&key).ctr(counter, &input[..bytes as usize], out);
    let mut head = String::new();
    hex(&mut head, &out[..16]);
    Ok(format!(
        "{{\"kib\":{kib},\"bytes\":{bytes},\"fnv64\":\"{:016x}\",\"head\":\"{head}\"}}",
        fnv1a64(out)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn fips197_and_sp800_38a_vectors() {
        assert_eq!(SBOX[0], 0x63);
        assert_eq!(SBOX[0x53], 0xed);
        let key: [u8; 16] = h("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
        let pt: [u8; 16] = h("00112233445566778899aabbccddeeff").try_into().unwrap();
        assert_eq!(
            Aes128::new(&key).encrypt_block(&pt).to_vec(),
            h("69c4e0d86a7b0430d8cdb78070b4c55a")
        );
        let key: [u8; 16] = h("2b7e151628aed2a6abf7158809cf4f3c").try_into().unwrap();
        let ctr: [u8; 16] = h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap();
        let pt = h("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710");
        let mut out = Vec::new();
        Aes128::new(&key).ctr(ctr, &pt, &mut out);
        assert_eq!(out, h("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee"));
    }
}
