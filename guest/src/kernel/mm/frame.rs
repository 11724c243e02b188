//! The physical frame allocator: a bitmap (bit set = frame in use) and the ground-truth table
//! (one [`GroundTruth`] word per frame: use and owner), both published in KInfo.
//!
//! Freed frames are not zeroed (like Linux); callers that need zeroed memory ask for it.
//!
//! Every instruction the kernel executes is emulated on this platform (CPL0 under PVM's
//! native mode), so zeroing a page costs hundreds of microseconds. RAM above the kernel image
//! is zero when the VMM starts the guest (a fresh memfd), so the allocator keeps a *fresh
//! frontier*: every frame at or above `fresh` is free and has never been used, hence zero.
//! Zeroed allocations come from the frontier (no zeroing needed) while it lasts; other
//! allocations recycle freed frames below it first. The ground-truth table also lives in that
//! zeroed RAM and is not cleared.

use kscope_guest::abi::kinfo::{frame_use, ground_truth, GroundTruth};
use kscope_guest::abi::layout::{KINFO_GPA, LOW_RESERVED_END, PAGE_SIZE};

use super::{page_up, va};
use crate::arch::KCell;
use crate::klib;

/// Allocator state.
pub struct Frames {
    bitmap: u64,
    gt: u64,
    count: u64,
    free: u64,
    /// Every frame below `low` is in use.
    low: u64,
    /// Every frame at or above `fresh` is free and zero.
    fresh: u64,
}

static FRAMES: KCell<Frames> = KCell::new(Frames {
    bitmap: 0,
    gt: 0,
    count: 0,
    free: 0,
    low: 0,
    fresh: 0,
});

/// Physical ranges the allocator must know about at boot.
pub struct BootLayout {
    /// Bytes of RAM.
    pub mem_bytes: u64,
    /// Kernel text [start, end) physical.
    pub text: (u64, u64),
    /// Kernel rodata + data + bss [start, end) physical.
    pub data: (u64, u64),
    /// First free physical address after the kernel image.
    pub free_start: u64,
}

impl Frames {
    fn word(&self, f: u64) -> *mut u64 {
        (self.bitmap + (f / 64) * 8) as *mut u64
    }

    fn is_used(&self, f: u64) -> bool {
        // SAFETY: `f < count`, so the word lies inside the bitmap.
        unsafe { (*self.word(f) >> (f % 64)) & 1 == 1 }
    }

    fn set_bit(&mut self, f: u64, used: bool) {
        let w = self.word(f);
        // SAFETY: `f < count`, so the word lies inside the bitmap.
        unsafe {
            if used {
                *w |= 1 << (f % 64);
            } else {
                *w &= !(1 << (f % 64));
            }
        }
    }

    fn set_gt(&mut self, f: u64, g: GroundTruth) {
        // SAFETY: `f < count`, so the word lies inside the ground-truth table.
        unsafe { *((self.gt + f * 4) as *mut u32) = g };
    }

    fn get_gt(&self, f: u64) -> GroundTruth {
        // SAFETY: as for `set_gt`.
        unsafe { *((self.gt + f * 4) as *const u32) }
    }

    fn take(&mut self, f: u64, use_: u8, owner: u32) {
        self.set_bit(f, true);
        self.set_gt(f, ground_truth(use_, owner));
        self.free -= 1;
    }
}

/// Initialise the allocator: the bitmap and the ground-truth table are placed at
/// `free_start`; returns the first physical address after them.
pub fn init(l: &BootLayout) -> u64 {
    let fr = FRAMES.get();
    let count = l.mem_bytes / PAGE_SIZE;
    let bitmap_bytes = count.div_ceil(64) * 8;
    let gt_bytes = count * 4;
    let bitmap_phys = page_up(l.free_start);
    let gt_phys = page_up(bitmap_phys + bitmap_bytes);
    let end = page_up(gt_phys + gt_bytes);
    fr.bitmap = va(bitmap_phys);
    fr.gt = va(gt_phys);
    fr.count = count;
    // SAFETY: the bitmap lies in RAM above the kernel image, owned by nobody else yet. (The
    // ground-truth table is zero already, see the module documentation.)
    unsafe { klib::memset(fr.bitmap as *mut u8, 0, bitmap_bytes as usize) };
    fr.free = count;
    let mark = |fr: &mut Frames, from: u64, to: u64, use_: u8| {
        let mut p = from & !(PAGE_SIZE - 1);
        while p < to && p / PAGE_SIZE < count {
            fr.take(p / PAGE_SIZE, use_, 0);
            p += PAGE_SIZE;
        }
    };
    mark(fr, 0, LOW_RESERVED_END, frame_use::BOOT);
    fr.set_gt(
        KINFO_GPA / PAGE_SIZE,
        ground_truth(frame_use::KERNEL_DATA, 0),
    );
    mark(fr, l.text.0, l.text.1, frame_use::KERNEL_TEXT);
    mark(fr, l.data.0, l.data.1, frame_use::KERNEL_DATA);
    // Whatever lies between the image and the tables (alignment, loader slack) is kernel data.
    mark(fr, l.data.1.max(l.text.1), end, frame_use::KERNEL_DATA);
    fr.low = 0;
    fr.fresh = end / PAGE_SIZE;
    crate::kinfo::set_frames(fr.bitmap, count, fr.free, fr.gt);
    end
}

/// Allocate one frame for `use_`/`owner`; its contents are whatever was there before.
pub fn alloc(use_: u8, owner: u32) -> Option<u64> {
    alloc_inner(use_, owner).map(|(p, _)| p)
}

/// Allocate one frame; also says whether it may hold old data (false: it is all zero).
/// Freed frames below the frontier first, then the frontier.
fn alloc_inner(use_: u8, owner: u32) -> Option<(u64, bool)> {
    let fr = FRAMES.get();
    let mut wi = fr.low / 64;
    while wi * 64 < fr.fresh {
        // SAFETY: `wi * 64 < fresh <= count`: inside the bitmap.
        let w = unsafe { *((fr.bitmap + wi * 8) as *const u64) };
        if w != u64::MAX {
            let f = wi * 64 + (!w).trailing_zeros() as u64;
            if f < fr.fresh {
                fr.take(f, use_, owner);
                fr.low = f + 1;
                crate::kinfo::set_free_frames(fr.free);
                return Some((f * PAGE_SIZE, true));
            }
            break;
        }
        wi += 1;
    }
    fr.low = fr.fresh;
    take_fresh(fr, use_, owner).map(|p| (p, false))
}

fn take_fresh(fr: &mut Frames, use_: u8, owner: u32) -> Option<u64> {
    if fr.fresh >= fr.count {
        return None;
    }
    let f = fr.fresh;
    fr.fresh += 1;
    fr.take(f, use_, owner);
    crate::kinfo::set_free_frames(fr.free);
    Some(f * PAGE_SIZE)
}

/// A never-used (zero) frame from the fresh frontier, or `None` when the frontier is used up.
pub fn alloc_fresh(use_: u8, owner: u32) -> Option<u64> {
    take_fresh(FRAMES.get(), use_, owner)
}

/// Allocate one zeroed frame (from the fresh frontier while it lasts: no zeroing needed).
pub fn alloc_zeroed(use_: u8, owner: u32) -> Option<u64> {
    if let Some(p) = take_fresh(FRAMES.get(), use_, owner) {
        return Some(p);
    }
    let (p, dirty) = alloc_inner(use_, owner)?;
    if dirty {
        klib::zero_page(va(p));
    }
    Some(p)
}

/// Allocate `n` physically contiguous frames (not zeroed); returns the first.
pub fn alloc_contig(n: u64, use_: u8, owner: u32) -> Option<u64> {
    let fr = FRAMES.get();
    if n == 0 || fr.free < n {
        return None;
    }
    let mut run = 0;
    let mut f = 0;
    while f < fr.count {
        if f % 64 == 0 && f + 64 <= fr.count {
            // SAFETY: word `f / 64` lies inside the bitmap.
            let w = unsafe { *((fr.bitmap + (f / 64) * 8) as *const u64) };
            if w == u64::MAX {
                run = 0;
                f += 64;
                continue;
            }
            if w == 0 && run + 64 < n {
                run += 64;
                f += 64;
                continue;
            }
        }
        if fr.is_used(f) {
            run = 0;
        } else {
            run += 1;
            if run == n {
                let first = f + 1 - n;
                for g in first..=f {
                    fr.take(g, use_, owner);
                }
                // Keep the frontier invariant: everything at or above it is free and zero.
                fr.fresh = fr.fresh.max(f + 1);
                crate::kinfo::set_free_frames(fr.free);
                return Some(first * PAGE_SIZE);
            }
        }
        f += 1;
    }
    None
}

/// Return a frame to the allocator (its contents are left as they are).
pub fn free(phys: u64) {
    let fr = FRAMES.get();
    let f = phys / PAGE_SIZE;
    if f >= fr.count || !fr.is_used(f) || phys < LOW_RESERVED_END {
        crate::kprint!(s "kscope: bad frame free ", x phys, s "\n");
        return;
    }
    fr.set_bit(f, false);
    fr.set_gt(f, ground_truth(frame_use::FREE, 0));
    fr.low = fr.low.min(f);
    fr.free += 1;
    crate::kinfo::set_free_frames(fr.free);
}

/// Change the recorded use of an allocated frame.
pub fn set_use(phys: u64, use_: u8, owner: u32) {
    let fr = FRAMES.get();
    let f = phys / PAGE_SIZE;
    if f < fr.count {
        fr.set_gt(f, ground_truth(use_, owner));
    }
}

/// The recorded use of a frame.
pub fn get_use(phys: u64) -> GroundTruth {
    let fr = FRAMES.get();
    let f = phys / PAGE_SIZE;
    if f < fr.count {
        fr.get_gt(f)
    } else {
        0
    }
}

/// Number of free frames.
pub fn free_count() -> u64 {
    FRAMES.get().free
}
