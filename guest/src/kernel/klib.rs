//! The C memory functions the compiler emits calls to. The kernel links no libc and the
//! precompiled `core` of this target expects them; they are written with string instructions
//! (no SSE, and no loop the optimiser could turn back into a call to themselves).

use core::arch::asm;

/// Copy `n` bytes between non-overlapping buffers.
///
/// # Safety
/// `dst` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; quadwords first, then the tail bytes, both
    // forward (DF is clear). Every iteration of a string instruction costs an emulation step
    // at CPL0 on this platform, so 8 bytes per step matter.
    unsafe {
        asm!("rep movsq", "mov ecx, {tail:e}", "rep movsb", tail = in(reg) n & 7,
            inout("rcx") n >> 3 => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
    dst
}

/// Copy `n` bytes between possibly overlapping buffers.
///
/// # Safety
/// `dst` and `src` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let (d, s) = (dst as usize, src as usize);
    if n == 0 || d <= s || d >= s + n {
        // SAFETY: a forward copy is correct when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy (DF set, cleared again) of ranges the caller guarantees valid.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") d + n - 1 => _,
            inout("rsi") s + n - 1 => _, options(nostack));
    }
    dst
}

/// Fill `n` bytes with `c`.
///
/// # Safety
/// `dst` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let pattern = (c as u8 as u64).wrapping_mul(0x0101_0101_0101_0101);
    // SAFETY: the caller guarantees the range; quadwords first, then the tail bytes.
    unsafe {
        asm!("rep stosq", "mov ecx, {tail:e}", "rep stosb", tail = in(reg) n & 7,
            inout("rcx") n >> 3 => _, inout("rdi") dst => _, in("rax") pattern,
            options(nostack, preserves_flags));
    }
    dst
}

/// Compare `n` bytes.
///
/// # Safety
/// Both pointers must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n`, both ranges are valid for `n` bytes (caller). Volatile reads keep
        // the loop from being recognised as a `memcmp` idiom.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// Compare `n` bytes for equality (0 = equal).
///
/// # Safety
/// Both pointers must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`.
    unsafe { memcmp(a, b, n) }
}

/// Required by the precompiled `core` of the host target (never called: panic = abort).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Zero a 4 KiB page given by its direct-map address.
pub fn zero_page(va: u64) {
    // SAFETY: callers pass the direct-map address of a whole frame they own.
    unsafe { memset(va as *mut u8, 0, 4096) };
}

/// Copy 4 KiB between two pages given by their direct-map addresses.
pub fn copy_page(dst: u64, src: u64) {
    // SAFETY: callers pass direct-map addresses of two distinct whole frames.
    unsafe { memcpy(dst as *mut u8, src as *const u8, 4096) };
}

/// Copy `len` bytes between kernel virtual addresses (direct map or image).
pub fn copy(dst: u64, src: u64, len: usize) {
    // SAFETY: callers pass valid, non-overlapping kernel ranges of `len` bytes.
    unsafe { memcpy(dst as *mut u8, src as *const u8, len) };
}

/// Compare two byte strings for equality.
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    // SAFETY: both slices are valid for their length, compared only when lengths match.
    a.len() == b.len() && unsafe { memcmp(a.as_ptr(), b.as_ptr(), a.len()) } == 0
}
