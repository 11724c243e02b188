//! The `compress` function: LZ77 compression of the first N KiB of `/data/text/corpus.txt`.
//!
//! Request: `kib=N [level=L]` (L in 1..=9: hash-chain search depth 2^L, default 4). The answer
//! payload is the compressed stream itself, format `KLZ1`:
//!
//! ```text
//! "KLZ1" | original length u32 LE | sequences
//! sequence = token u8 (high nibble: literal count, low nibble: match length - 4; 15 means
//!            "more follows": extra bytes, each added, until one is < 255)
//!            | literal-count extension | literals | offset u16 LE (1..=65535)
//!            | match-length extension
//! ```
//!
//! The last sequence holds only literals (it ends the stream after its literals). Working set:
//! input pages, a 64 Ki-entry hash head table, a chain table the size of the input, and the
//! output buffer.

use alloc::vec::Vec;

use crate::data::func::CORPUS_PATH;
use crate::files::{FileError, Files};
use crate::util::param;

/// Why the function failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    /// A parameter is missing or out of range.
    #[error("bad request: {0} (expected `kib=N [level=1..9]`)")]
    Bad(&'static str),
    /// More KiB requested than the input has.
    #[error("kib={0} exceeds the input ({1} KiB)")]
    TooLarge(u64, u64),
    /// The input could not be read.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Stream magic.
pub const MAGIC: &[u8; 4] = b"KLZ1";
const MIN_MATCH: usize = 4;
const WINDOW: usize = 65_535;
const HASH_BITS: u32 = 16;

fn put_len(out: &mut Vec<u8>, mut extra: usize) {
    while extra >= 255 {
        out.push(255);
        extra -= 255;
    }
    out.push(extra as u8);
}

fn hash4(b: &[u8]) -> usize {
    let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    (v.wrapping_mul(2_654_435_761) >> (32 - HASH_BITS)) as usize
}

fn emit(out: &mut Vec<u8>, lits: &[u8], m: Option<(usize, usize)>) {
    let ll = lits.len();
    let ml = m.map_or(0, |(_, len)| len - MIN_MATCH);
    out.push(((ll.min(15) as u8) << 4) | ml.min(15) as u8);
    if ll >= 15 {
        put_len(out, ll - 15);
    }
    out.extend_from_slice(lits);
    if let Some((off, _)) = m {
        out.extend_from_slice(&(off as u16).to_le_bytes());
        if ml >= 15 {
            put_len(out, ml - 15);
        }
    }
}

/// Compress `input` into `out` with chain depth `depth`.
pub fn compress(input: &[u8], depth: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(input.len() as u32).to_le_bytes());
    let mut head = alloc::vec![u32::MAX; 1 << HASH_BITS];
    let mut chain = alloc::vec![u32::MAX; input.len()];
    let mut lit_start = 0;
    let mut i = 0;
    let insert = |head: &mut [u32], chain: &mut [u32], p: usize| {
        let h = hash4(&input[p..]);
        chain[p] = head[h];
        head[h] = p as u32;
    };
    while i + MIN_MATCH <= input.len() {
        let h = hash4(&input[i..]);
        let mut cand = head[h];
        let (mut best_len, mut best_off) = (0, 0);
        for _ in 0..depth {
            if cand == u32::MAX || i - cand as usize > WINDOW {
                break;
            }
            let c = cand as usize;
            let len = input[c..]
                .iter()
                .zip(&input[i..])
                .take_while(|(a, b)| a == b)
                .count();
            if len > best_len {
                best_len = len;
                best_off = i - c;
            }
            cand = chain[c];
        }
        if best_len >= MIN_MATCH {
            emit(out, &input[lit_start..i], Some((best_off, best_len)));
            let end = i + best_len;
            while i < end {
                if i + MIN_MATCH <= input.len() {
                    insert(&mut head, &mut chain, i);
                }
                i += 1;
            }
            lit_start = i;
        } else {
            insert(&mut head, &mut chain, i);
            i += 1;
        }
    }
    emit(out, &input[lit_start..], None);
}

/// Run the function; the answer is written to `out`.
pub fn run<F: Files>(files: &mut F, request: &str, out: &mut Vec<u8>) -> Result<(), CompressError> {
    let kib: u64 = param(request, "kib")
        .ok_or(CompressError::Bad("missing kib"))?
        .parse()
        .map_err(|_| CompressError::Bad("kib must be a number"))?;
    let level: u32 = match param(request, "level") {
        None => 4,
        Some(l) => l
            .parse()
            .map_err(|_| CompressError::Bad("level must be a number"))?,
    };
    if !(1..=9).contains(&level) {
        return Err(CompressError::Bad("level out of range"));
    }
    let input = files.map(CORPUS_PATH)?;
    let bytes = kib as usize * 1024;
    if kib == 0 || bytes > input.len() {
        return Err(CompressError::TooLarge(kib, input.len() as u64 / 1024));
    }
    compress(&input[..bytes], 1 << level, out);
    Ok(())
}
