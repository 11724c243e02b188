//! The global allocator of guest programs.
//!
//! Power-of-two size classes from 16 B to 32 KiB carved out of 256 KiB chunks obtained with
//! anonymous `mmap` (pages are populated on first touch by the kernel), each class with an
//! intrusive free list. Blocks from 64 KiB to 64 MiB are power-of-two mappings of their own,
//! kept on per-size free lists when freed and reused: servers allocate the same sizes request
//! after request, and unmapping them would fragment the process's address space (the kernel
//! keeps a small, fixed number of memory areas per process) and cost two system calls per
//! allocation. Larger blocks are mapped and unmapped directly. Guest processes are
//! single-threaded, so there is no locking.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

use super::sys;
use crate::abi::syscall::prot;

const MIN_SHIFT: u32 = 4; // 16 bytes
const MAX_SHIFT: u32 = 15; // 32 KiB
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
const BIG_MIN_SHIFT: u32 = 16; // 64 KiB
const BIG_MAX_SHIFT: u32 = 26; // 64 MiB
const BIG_CLASSES: usize = (BIG_MAX_SHIFT - BIG_MIN_SHIFT + 1) as usize;
const CHUNK: usize = 256 * 1024;
const PAGE: usize = 4096;

struct State {
    free: [*mut u8; CLASSES],
    big_free: [*mut u8; BIG_CLASSES],
    bump: *mut u8,
    bump_end: *mut u8,
}

/// The allocator (install with `#[global_allocator]`, done by this module).
pub struct UserAlloc(UnsafeCell<State>);

// SAFETY: guest processes are single-threaded (the kernel has no threads), so the state is
// never accessed concurrently.
unsafe impl Sync for UserAlloc {}

#[global_allocator]
static ALLOC: UserAlloc = UserAlloc(UnsafeCell::new(State {
    free: [ptr::null_mut(); CLASSES],
    big_free: [ptr::null_mut(); BIG_CLASSES],
    bump: ptr::null_mut(),
    bump_end: ptr::null_mut(),
}));

fn class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    if size > 1 << MAX_SHIFT {
        return None;
    }
    let shift = usize::BITS - (size - 1).leading_zeros();
    Some((shift - MIN_SHIFT) as usize)
}

/// The big class of a layout too large for the small classes, if it has one.
fn big_class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size().max(1 << BIG_MIN_SHIFT);
    if size > 1 << BIG_MAX_SHIFT {
        return None;
    }
    let shift = usize::BITS - (size - 1).leading_zeros();
    Some((shift - BIG_MIN_SHIFT) as usize)
}

fn map_anon(len: usize) -> *mut u8 {
    match sys::mmap(len as u64, prot::READ | prot::WRITE, None, 0) {
        Ok(addr) => addr as *mut u8,
        Err(_) => ptr::null_mut(),
    }
}

// SAFETY: blocks handed out are valid, disjoint and at least `layout.size()` bytes with the
// requested alignment (power-of-two classes carved at class-size offsets from page-aligned
// chunks; large blocks are page aligned), and are only reused after `dealloc`.
unsafe impl GlobalAlloc for UserAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > PAGE {
            return ptr::null_mut();
        }
        // SAFETY: single-threaded (see `Sync` impl): this is the only live reference.
        let st = unsafe { &mut *self.0.get() };
        let Some(class) = class_of(&layout) else {
            let Some(big) = big_class_of(&layout) else {
                return map_anon(layout.size().next_multiple_of(PAGE));
            };
            let head = st.big_free[big];
            if !head.is_null() {
                // SAFETY: free blocks store the next pointer in their first word.
                st.big_free[big] = unsafe { (head as *mut *mut u8).read() };
                return head;
            }
            return map_anon(1 << (big as u32 + BIG_MIN_SHIFT));
        };
        let head = st.free[class];
        if !head.is_null() {
            // SAFETY: free blocks store the next pointer in their first word.
            st.free[class] = unsafe { (head as *mut *mut u8).read() };
            return head;
        }
        let size = 1usize << (class as u32 + MIN_SHIFT);
        let aligned = (st.bump as usize).next_multiple_of(size);
        if st.bump.is_null() || aligned + size > st.bump_end as usize {
            let chunk = map_anon(CHUNK);
            if chunk.is_null() {
                return ptr::null_mut();
            }
            st.bump = chunk;
            // SAFETY: the chunk is CHUNK bytes long.
            st.bump_end = unsafe { chunk.add(CHUNK) };
            // The chunk is page aligned, so it is aligned for every class.
            // SAFETY: size <= 32 KiB < CHUNK.
            st.bump = unsafe { chunk.add(size) };
            return chunk;
        }
        // SAFETY: `aligned + size <= bump_end`, inside the current chunk.
        st.bump = unsafe { (aligned as *mut u8).add(size) };
        aligned as *mut u8
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: single-threaded (see `Sync` impl).
        let st = unsafe { &mut *self.0.get() };
        match class_of(&layout) {
            Some(class) => {
                // SAFETY: `p` is a block of this class (>= 16 bytes, aligned) we handed out.
                unsafe { (p as *mut *mut u8).write(st.free[class]) };
                st.free[class] = p;
            }
            None => match big_class_of(&layout) {
                Some(big) => {
                    // SAFETY: `p` is a mapped block of this big class we handed out.
                    unsafe { (p as *mut *mut u8).write(st.big_free[big]) };
                    st.big_free[big] = p;
                }
                None => {
                    let _ = sys::munmap(p as u64, layout.size().next_multiple_of(PAGE) as u64);
                }
            },
        }
    }
}
