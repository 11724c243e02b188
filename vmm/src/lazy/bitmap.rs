//! Page bitmaps: a plain one for frozen layers and an atomic one shared between a clone's
//! handler and fetcher threads.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::prefetch::Gfn;

/// A fixed-size bitmap of frames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
}

impl Bitmap {
    /// An all-clear bitmap of `bits` frames.
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    /// An all-set bitmap of `bits` frames.
    pub fn full(bits: u64) -> Self {
        let mut b = Self::new(bits);
        b.set_range(0, bits);
        b
    }

    /// Number of frames covered.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True if the bitmap covers no frames.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Whether `gfn` is set (false beyond the end).
    pub fn get(&self, gfn: Gfn) -> bool {
        gfn < self.bits && self.words[(gfn / 64) as usize] & (1 << (gfn % 64)) != 0
    }

    /// Sets `gfn` (ignored beyond the end).
    pub fn set(&mut self, gfn: Gfn) {
        if gfn < self.bits {
            self.words[(gfn / 64) as usize] |= 1 << (gfn % 64);
        }
    }

    /// Clears `gfn`.
    pub fn clear(&mut self, gfn: Gfn) {
        if gfn < self.bits {
            self.words[(gfn / 64) as usize] &= !(1 << (gfn % 64));
        }
    }

    /// Sets frames `[start, end)` (clamped to the bitmap).
    pub fn set_range(&mut self, start: Gfn, end: Gfn) {
        for g in start..end.min(self.bits) {
            self.set(g);
        }
    }

    /// Number of set frames.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The set frames in ascending order (clear words are skipped whole).
    pub fn iter_set(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = i as u64 * 64;
            let mut rest = w;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let b = rest.trailing_zeros() as u64;
                    rest &= rest - 1;
                    base + b
                })
            })
        })
    }

    /// Word `i` of the bitmap: frames `64 * i ..= 64 * i + 63`, bit `k` for frame `64 * i + k`
    /// (zero beyond the end).
    pub fn word(&self, i: u64) -> u64 {
        self.words.get(i as usize).copied().unwrap_or(0)
    }

    /// Number of words (groups of 64 frames).
    pub fn words(&self) -> u64 {
        self.words.len() as u64
    }
}

/// A fixed-size bitmap with atomic set/test, shared between threads.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

/// `n` zeroed atomic words from the allocator's zeroed memory: a large bitmap (128 KiB for 4
/// GiB of guest memory) is then mapped zero pages until first written, instead of being
/// written word by word when it is made (which was ~0.1 ms of every 4 GiB clone's start).
fn zeroed_words(n: usize) -> Box<[AtomicU64]> {
    if n == 0 {
        return Box::new([]);
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n).expect("bitmap size fits a layout");
    // SAFETY: `layout` has a non-zero size (n > 0).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicU64>();
    if p.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `p` is a fresh allocation of `layout` (n AtomicU64, the global allocator, as
    // `Box` uses), all zero bytes, which is a valid `AtomicU64` (0); the box takes ownership.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) }
}

impl AtomicBitmap {
    /// An all-clear bitmap of `bits` frames.
    pub fn new(bits: u64) -> Self {
        Self {
            words: zeroed_words(bits.div_ceil(64) as usize),
            bits,
        }
    }

    /// Number of frames covered.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True if the bitmap covers no frames.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Whether `gfn` is set (false beyond the end).
    pub fn get(&self, gfn: Gfn) -> bool {
        gfn < self.bits
            && self.words[(gfn / 64) as usize].load(Ordering::Acquire) & (1 << (gfn % 64)) != 0
    }

    /// Sets `gfn`; returns true if it was clear before (false beyond the end).
    pub fn set(&self, gfn: Gfn) -> bool {
        if gfn >= self.bits {
            return false;
        }
        let bit = 1 << (gfn % 64);
        self.words[(gfn / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Clears `gfn`; returns true if it was set before.
    pub fn clear(&self, gfn: Gfn) -> bool {
        if gfn >= self.bits {
            return false;
        }
        let bit = 1 << (gfn % 64);
        self.words[(gfn / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Number of set frames.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// A point-in-time copy.
    pub fn snapshot(&self) -> Bitmap {
        Bitmap {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            bits: self.bits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_frames_are_listed_in_order_across_words() {
        let mut b = Bitmap::new(300);
        for g in [0, 1, 2, 63, 64, 70, 200, 299] {
            b.set(g);
        }
        assert_eq!(
            b.iter_set().collect::<Vec<_>>(),
            [0, 1, 2, 63, 64, 70, 200, 299]
        );
        assert_eq!((b.words(), b.word(1), b.word(9)), (5, 0b100_0001, 0));
    }
}
