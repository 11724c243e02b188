//! Host memory plumbing, in one place: the page size and frame numbers, memfd creation and
//! owned `mmap` regions. Everything that creates a memfd or maps guest frames goes through
//! here ([`crate::memory::GuestRam`], [`crate::lazy::LazyRegion`], the page sources,
//! [`crate::dedup::AnonFrames`], the freeze's delta layer).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Size of a guest page: the x86-64 base page of the guest ABI
/// ([`kscope_guest::abi::layout::PAGE_SIZE`]), as a `usize` for buffers and offsets.
pub const PAGE_SIZE: usize = kscope_guest::abi::layout::PAGE_SIZE as usize;

/// A guest frame number (guest-physical address / [`PAGE_SIZE`]).
pub type Gfn = u64;

fn size_error(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Creates a close-on-exec memfd of `len` bytes (a hole: nothing allocated yet).
pub fn memfd_create(name: &CStr, len: u64) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the call returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone()?).set_len(len)?;
    Ok(fd)
}

/// Bytes allocated to a file (`st_blocks * 512`).
pub fn allocated_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let f = std::fs::File::from(fd.try_clone_to_owned()?);
    let m = f.metadata()?;
    Ok(std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access goes through raw
// pointer copies whose callers accept that the contents may change (guest memory semantics).
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (or anonymous `MAP_NORESERVE` memory if `None`), shared or
    /// private.
    pub fn new(
        fd: Option<BorrowedFd<'_>>,
        len: usize,
        writable: bool,
        shared: bool,
    ) -> io::Result<Self> {
        if len == 0 {
            return Err(size_error("cannot map 0 bytes".into()));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let mut flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if fd.is_none() {
            flags |= libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        }
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at a kernel-chosen address; it aliases no Rust object.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (construction rejects empty mappings).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: the source range is inside the live mapping (checked) and cannot overlap the
        // exclusively borrowed destination.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset` (the mapping must be writable).
    pub fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: the destination range is inside the live, writable mapping (checked by the
        // callers' construction) and cannot overlap the borrowed source.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// `madvise(advice)` on `[offset, offset + len)`.
    pub fn advise(&self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside the live mapping (checked); madvise changes how the
        // kernel treats it, and callers pick advice that keeps Rust's view valid.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(size_error(format!(
                "access [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping",
                self.len
            )));
        }
        Ok(())
    }

    /// Pages resident according to `mincore` (counts mapped zero pages too).
    pub fn mincore_pages(&self) -> io::Result<u64> {
        let mut vec = vec![0u8; self.len.div_ceil(PAGE_SIZE)];
        // SAFETY: the range is the live mapping; `vec` has one byte per page.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().filter(|b| *b & 1 != 0).count() as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region this value mapped; nothing refers to it anymore.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_mappings_read_back_what_was_written_and_check_bounds() {
        let fd = memfd_create(c"kscope-test", 2 * PAGE_SIZE as u64).unwrap();
        let m = Mapping::new(
            Some(std::os::fd::AsFd::as_fd(&fd)),
            2 * PAGE_SIZE,
            true,
            true,
        )
        .unwrap();
        m.write(PAGE_SIZE + 3, b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read(PAGE_SIZE + 3, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(m.write(2 * PAGE_SIZE - 1, b"xy").is_err());
        assert!(allocated_bytes(std::os::fd::AsFd::as_fd(&fd)).unwrap() >= PAGE_SIZE as u64);
        assert!(Mapping::new(None, 0, true, false).is_err());
    }
}
