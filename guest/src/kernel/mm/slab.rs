//! A minimal slab for fixed-size kernel objects (radix-tree nodes): frames are carved into
//! objects on demand (tagged KERNEL_DATA), freed objects go to an intrusive free list.

use kscope_guest::abi::kinfo::frame_use;
use kscope_guest::abi::layout::PAGE_SIZE;

use super::{frame, va};
use crate::klib;

/// A cache of objects of one size.
pub struct Slab {
    size: u64,
    free: u64,
}

impl Slab {
    /// A cache of `size`-byte objects (8-byte aligned, at most a page).
    pub const fn new(size: u64) -> Self {
        Slab {
            size: (size + 7) & !7,
            free: 0,
        }
    }

    /// A zeroed object (kernel virtual address), or `None` when out of memory.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            let f = frame::alloc(frame_use::KERNEL_DATA, 0)?;
            let base = va(f);
            let n = PAGE_SIZE / self.size;
            for i in (0..n).rev() {
                let o = base + i * self.size;
                // SAFETY: `o` lies in the frame just allocated, 8-byte aligned.
                unsafe { *(o as *mut u64) = self.free };
                self.free = o;
            }
        }
        let o = self.free;
        // SAFETY: free objects store the next pointer in their first word.
        self.free = unsafe { *(o as *const u64) };
        // SAFETY: `o` is a whole object of this cache, owned by nobody.
        unsafe { klib::memset(o as *mut u8, 0, self.size as usize) };
        Some(o)
    }

    /// Return an object.
    pub fn free(&mut self, o: u64) {
        // SAFETY: `o` is an object of this cache that the caller no longer uses.
        unsafe { *(o as *mut u64) = self.free };
        self.free = o;
    }
}
