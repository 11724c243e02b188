//! The guest ABI: every structure and constant shared between the kscope guest kernel, its
//! user programs, the VMM and outside readers such as the colorer. `#[repr(C)]`, versioned,
//! with no dependency on the kernel's private code.

pub mod boot;
pub mod fs;
pub mod kinfo;
pub mod layout;
pub mod net;
pub mod request;
pub mod syscall;

pub use boot::{BootInfo, DeviceDesc, DeviceKind, GenPage, Identity};
pub use kinfo::{FileAbi, KInfo, ProcAbi, RadixNode};

/// Panic codes written to [`layout::ports::PANIC`].
pub mod panic_code {
    /// Rust panic in the kernel.
    pub const RUST_PANIC: u32 = 1;
    /// Unexpected exception in kernel mode.
    pub const KERNEL_EXCEPTION: u32 = 2;
    /// Out of memory during boot.
    pub const OUT_OF_MEMORY: u32 = 3;
    /// Bad boot information or missing device.
    pub const BAD_BOOT: u32 = 4;
    /// The root file system is corrupt.
    pub const BAD_FS: u32 = 5;
    /// The init program could not be started.
    pub const NO_INIT: u32 = 6;
}

/// View a `#[repr(C)]` plain-old-data value as bytes.
///
/// Only for the ABI structs of this module, which contain no padding-sensitive invariants
/// and no pointers with lifetimes.
pub fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: `v` is a valid reference to `size_of::<T>()` initialized bytes for the lifetime
    // of the returned slice; ABI structs are plain data (`Copy`, `repr(C)`).
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>()) }
}

/// Read a `#[repr(C)]` plain-old-data ABI value from the start of `bytes`.
///
/// Returns `None` if `bytes` is too short. Only for the ABI structs of this module, for which
/// every bit pattern is a valid value.
pub fn from_bytes<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the source holds at least `size_of::<T>()` bytes, `read_unaligned` has no
    // alignment requirement, and the ABI structs accept any bit pattern (integers and arrays).
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}
