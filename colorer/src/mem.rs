//! Guest-physical memory as the colorer sees it: a read-only view of a paused guest's RAM or of
//! a saved generation image.

use kscope_guest::abi::layout::PAGE_SIZE;

/// A guest frame number (guest-physical address / 4096).
pub type Gfn = u64;

/// Errors of guest-physical reads.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The range is not inside guest RAM.
    #[error(
        "guest-physical range {gpa:#x}+{len:#x} is outside guest RAM ({size:#x} bytes): \
         the guest pointer is corrupt or the memory image is truncated"
    )]
    OutOfRange {
        /// Start of the read.
        gpa: u64,
        /// Length of the read.
        len: usize,
        /// Size of guest RAM.
        size: u64,
    },
    /// The backing store failed (for implementations over files or mappings).
    #[error("reading guest memory at {gpa:#x} failed: {reason}; check that the image is readable")]
    Backend {
        /// Start of the read.
        gpa: u64,
        /// What went wrong.
        reason: String,
    },
}

/// Read-only guest-physical memory, starting at GPA 0.
///
/// Implemented here for memory images (`[u8]`, `Vec<u8>` and references to them); the VMM
/// implements it over guest RAM or generation images. The guest must not run while a
/// [`crate::ColorMap`] is computed from it (the colorer reads structures in several steps).
pub trait PhysMem {
    /// Bytes of guest RAM (GPAs `0..size()` are readable).
    fn size(&self) -> u64;

    /// Copy `buf.len()` bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Fast path: the 4 KiB of frame `gfn` in place, if the implementation has them mapped.
    /// `None` makes callers fall back to [`PhysMem::read`].
    fn page(&self, gfn: Gfn) -> Option<&[u8]> {
        let _ = gfn;
        None
    }
}

impl PhysMem for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let oor = || MemError::OutOfRange {
            gpa,
            len: buf.len(),
            size: self.len() as u64,
        };
        let start = usize::try_from(gpa).map_err(|_| oor())?;
        let end = start.checked_add(buf.len()).ok_or_else(oor)?;
        let src = self.get(start..end).ok_or_else(oor)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn page(&self, gfn: Gfn) -> Option<&[u8]> {
        let start = usize::try_from(gfn.checked_mul(PAGE_SIZE)?).ok()?;
        self.get(start..start.checked_add(PAGE_SIZE as usize)?)
    }
}

impl PhysMem for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.as_slice().read(gpa, buf)
    }

    fn page(&self, gfn: Gfn) -> Option<&[u8]> {
        self.as_slice().page(gfn)
    }
}

impl<T: PhysMem + ?Sized> PhysMem for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(gpa, buf)
    }

    fn page(&self, gfn: Gfn) -> Option<&[u8]> {
        (**self).page(gfn)
    }
}

/// Number of whole frames in `mem`.
pub fn frame_count<M: PhysMem + ?Sized>(mem: &M) -> u64 {
    mem.size() / PAGE_SIZE
}

/// Read a little-endian `u64` at `gpa`.
pub fn read_u64<M: PhysMem + ?Sized>(mem: &M, gpa: u64) -> Result<u64, MemError> {
    let mut b = [0u8; 8];
    mem.read(gpa, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Read the 512 little-endian `u64` entries of the frame `gfn` (a page-table page).
pub fn read_entries<M: PhysMem + ?Sized>(
    mem: &M,
    gfn: Gfn,
    out: &mut [u64; 512],
) -> Result<(), MemError> {
    match mem.page(gfn) {
        Some(p) => {
            for (e, c) in out.iter_mut().zip(p.chunks_exact(8)) {
                *e = u64::from_le_bytes(c.try_into().unwrap_or_default());
            }
        }
        None => {
            let mut buf = [0u8; PAGE_SIZE as usize];
            mem.read(gfn * PAGE_SIZE, &mut buf)?;
            for (e, c) in out.iter_mut().zip(buf.chunks_exact(8)) {
                *e = u64::from_le_bytes(c.try_into().unwrap_or_default());
            }
        }
    }
    Ok(())
}

/// True if every byte of `bytes` is zero (early exit on the first non-zero 64-byte block).
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// True if frame `gfn` holds only zero bytes.
pub fn page_is_zero<M: PhysMem + ?Sized>(mem: &M, gfn: Gfn) -> Result<bool, MemError> {
    match mem.page(gfn) {
        Some(p) => Ok(is_zero(p)),
        None => {
            let mut buf = [0u8; PAGE_SIZE as usize];
            mem.read(gfn * PAGE_SIZE, &mut buf)?;
            Ok(is_zero(&buf))
        }
    }
}

/// A fixed-size set of frames (a bitmap), e.g. "frames in use" or "zero frames".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameSet {
    words: Vec<u64>,
    frames: u64,
}

impl FrameSet {
    /// An empty set over `frames` frames.
    pub fn new(frames: u64) -> Self {
        FrameSet {
            words: vec![0; frames.div_ceil(64) as usize],
            frames,
        }
    }

    /// A set from a little-endian bitmap (bit `f` of byte `f / 8` = frame `f`), clipped to
    /// `frames` bits; missing bytes are zero.
    pub fn from_le_bitmap(bytes: &[u8], frames: u64) -> Self {
        let mut s = FrameSet::new(frames);
        for (w, chunk) in s.words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        let tail = frames % 64;
        if tail != 0 {
            if let Some(last) = s.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        s
    }

    /// Number of frames the set covers.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// True if `gfn` is in the set (false beyond the covered frames).
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn < self.frames && self.words[(gfn / 64) as usize] & (1 << (gfn % 64)) != 0
    }

    /// Add `gfn` (ignored beyond the covered frames).
    pub fn insert(&mut self, gfn: Gfn) {
        if gfn < self.frames {
            self.words[(gfn / 64) as usize] |= 1 << (gfn % 64);
        }
    }

    /// Number of frames in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True if no frame is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The frames in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(b))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_check_bounds() {
        let mem = vec![7u8; 8192];
        let mut b = [0u8; 16];
        mem.read(8192 - 16, &mut b).unwrap();
        assert_eq!(b, [7; 16]);
        assert!(matches!(
            mem.read(8192 - 15, &mut b),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(mem.read(u64::MAX - 3, &mut b).is_err());
        assert_eq!(mem.page(1).map(<[u8]>::len), Some(4096));
        assert!(mem.page(2).is_none());
        assert!(mem.page(u64::MAX).is_none());
        assert_eq!(frame_count(&mem), 2);
    }

    #[test]
    fn zero_detection() {
        let mut mem = vec![0u8; 3 * 4096];
        mem[4096 + 4095] = 1;
        assert!(page_is_zero(&mem, 0).unwrap());
        assert!(!page_is_zero(&mem, 1).unwrap());
        assert!(page_is_zero(&mem, 2).unwrap());
        assert!(page_is_zero(&mem, 3).is_err());
    }

    #[test]
    fn frame_set_roundtrip() {
        let s = FrameSet::from_le_bitmap(&[0b1000_0101, 0xff, 0xff], 12);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 2, 7, 8, 9, 10, 11]);
        assert_eq!(s.len(), 7);
        assert!(!s.contains(12));
        let mut t = FrameSet::new(130);
        t.insert(129);
        t.insert(64);
        t.insert(500);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![64, 129]);
        assert!(!t.is_empty());
    }
}
