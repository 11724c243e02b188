//! Memory mappings and a clone's destination memory.
//!
//! All raw `mmap`/`memfd` handling of the lazy module lives here behind safe types.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use super::{io_err, LazyError, Result, PAGE_SIZE};
use crate::prefetch::Gfn;
use crate::uffd::{features, RegisterMode, Uffd};

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// False for a mapping owned by someone else (not unmapped on drop).
    owned: bool,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access goes through raw
// pointer copies whose callers accept that the contents may change (guest memory semantics).
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (or anonymous memory if `None`).
    pub(crate) fn new(
        fd: Option<BorrowedFd<'_>>,
        len: usize,
        writable: bool,
        shared: bool,
    ) -> Result<Self> {
        if len == 0 {
            return Err(LazyError::Size("cannot map 0 bytes".into()));
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
            return Err(io_err(format!("mmap of {len} bytes")));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| LazyError::Size("mmap returned null".into()))?;
        Ok(Self {
            ptr,
            len,
            owned: true,
        })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub(crate) fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
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
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: the destination range is inside the live, writable mapping (checked by the
        // callers' construction) and cannot overlap the borrowed source.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(LazyError::Size(format!(
                "access [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping",
                self.len
            )));
        }
        Ok(())
    }

    /// Pages resident according to `mincore` (counts mapped zero pages too).
    pub(crate) fn mincore_pages(&self) -> Result<u64> {
        let mut vec = vec![0u8; self.len.div_ceil(PAGE_SIZE)];
        // SAFETY: the range is the live mapping; `vec` has one byte per page.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, vec.as_mut_ptr()) };
        if r != 0 {
            return Err(io_err("mincore"));
        }
        Ok(vec.iter().filter(|b| *b & 1 != 0).count() as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: unmaps exactly the region this value mapped; nothing refers to it anymore.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Creates a close-on-exec memfd of `len` bytes.
pub(crate) fn memfd_create(name: &CStr, len: u64) -> Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the call returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("memfd_create"));
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().map_err(|e| LazyError::Io {
        op: "dup memfd".into(),
        source: e,
    })?)
    .set_len(len)
    .map_err(|e| LazyError::Io {
        op: format!("ftruncate memfd to {len}"),
        source: e,
    })?;
    Ok(fd)
}

/// Bytes allocated to a file (`st_blocks * 512`).
pub(crate) fn allocated_bytes(fd: BorrowedFd<'_>) -> Result<u64> {
    let f = std::fs::File::from(fd.try_clone_to_owned().map_err(|e| LazyError::Io {
        op: "dup".into(),
        source: e,
    })?);
    let m = f.metadata().map_err(|e| LazyError::Io {
        op: "fstat".into(),
        source: e,
    })?;
    Ok(std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

/// Guest memory backed by a memfd mapped `MAP_SHARED`, without userfaultfd (a parent's RAM, or
/// an eagerly filled clone).
#[derive(Debug)]
pub struct GuestMemfd {
    map: Mapping,
    fd: OwnedFd,
}

impl GuestMemfd {
    /// Creates `pages` pages of zeroed (unallocated) memory.
    pub fn new(pages: u64) -> Result<Self> {
        let fd = memfd_create(c"kscope-guest", pages * PAGE_SIZE as u64)?;
        let map = Mapping::new(Some(fd.as_fd()), (pages as usize) * PAGE_SIZE, true, true)?;
        Ok(Self { map, fd })
    }

    /// Host virtual address of guest frame 0 (for a KVM memory slot).
    pub fn host_addr(&self) -> u64 {
        self.map.addr()
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True if empty (never: construction rejects 0 pages).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE as u64
    }

    /// The memfd (dup it to build a [`MemfdImage`](super::MemfdImage) of this memory).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads guest memory at byte `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.map.read(offset as usize, buf)
    }

    /// Writes guest memory at byte `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.map.write(offset as usize, data)
    }

    /// Bytes of host memory allocated to the memfd.
    pub fn resident_bytes(&self) -> Result<u64> {
        allocated_bytes(self.fd.as_fd())
    }
}

/// How a [`LazyRegion`]'s destination memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum RegionKind {
    /// A memfd mapped `MAP_SHARED` (default): the clone's memory is a file that can itself be
    /// frozen and cloned, and its footprint is the memfd's allocated blocks.
    #[default]
    SharedMemfd,
    /// Anonymous `MAP_PRIVATE` memory (zero-fill maps the shared zero page; cannot be shared).
    AnonPrivate,
}

/// A clone's destination memory registered with its own userfaultfd in MISSING mode: every
/// first access (by any thread, user or kernel mode, including KVM on a vCPU's behalf) raises a
/// fault event that a [`FaultServer`](super::FaultServer) serves.
///
/// Drop order closes the userfaultfd first (waking any blocked thread, whose access then
/// succeeds on empty memory), then unmaps, then closes the memfd.
#[derive(Debug)]
pub struct LazyRegion {
    uffd: Uffd,
    map: Mapping,
    /// Shared with the VM's guest RAM ([`LazyRegion::memfd_file`]): no dup per clone.
    fd: Option<std::sync::Arc<std::fs::File>>,
    kind: RegionKind,
}

impl LazyRegion {
    /// Creates and registers `pages` pages of destination memory.
    pub fn new(pages: u64, kind: RegionKind) -> Result<Self> {
        let len = (pages as usize) * PAGE_SIZE;
        let (fd, map) = match kind {
            RegionKind::SharedMemfd => {
                let fd = memfd_create(c"kscope-clone", len as u64)?;
                let map = Mapping::new(Some(fd.as_fd()), len, true, true)?;
                (Some(std::sync::Arc::new(std::fs::File::from(fd))), map)
            }
            RegionKind::AnonPrivate => (None, Mapping::new(None, len, true, false)?),
        };
        let uffd = Uffd::new(features::MISSING_SHMEM | features::EVENT_REMOVE)?;
        uffd.register(map.addr(), len as u64, RegisterMode::MISSING)?;
        Ok(Self {
            uffd,
            map,
            fd,
            kind,
        })
    }

    /// Registers an existing mapping instead of creating one, e.g. the VMM's own guest RAM
    /// mapping (a fresh memfd mapped `MAP_SHARED`, given as `memfd`, or anonymous memory with
    /// `memfd: None`), so that KVM's memory slot and this server use the same addresses. The
    /// mapping is not unmapped on drop; the memfd is closed.
    ///
    /// # Safety
    ///
    /// `[addr, addr + pages * 4096)` must be a live, writable mapping (of `memfd` if given) that
    /// stays mapped for the life of the returned region, used only as guest memory: the fault
    /// server writes into its missing pages and no Rust reference may point into it.
    pub unsafe fn from_mapping(addr: u64, pages: u64, memfd: Option<OwnedFd>) -> Result<Self> {
        let len = (pages as usize) * PAGE_SIZE;
        let ptr = NonNull::new(addr as *mut u8)
            .filter(|_| addr.is_multiple_of(PAGE_SIZE as u64) && len > 0)
            .ok_or_else(|| LazyError::Size(format!("mapping at {addr:#x} of {pages} pages")))?;
        let map = Mapping {
            ptr,
            len,
            owned: false,
        };
        let kind = if memfd.is_some() {
            RegionKind::SharedMemfd
        } else {
            RegionKind::AnonPrivate
        };
        let uffd = Uffd::new(features::MISSING_SHMEM | features::EVENT_REMOVE)?;
        uffd.register(addr, len as u64, RegisterMode::MISSING)?;
        Ok(Self {
            uffd,
            map,
            fd: memfd.map(|f| std::sync::Arc::new(std::fs::File::from(f))),
            kind,
        })
    }

    /// Host virtual address of guest frame 0.
    pub fn host_addr(&self) -> u64 {
        self.map.addr()
    }

    /// Host address of a frame.
    pub fn gfn_addr(&self, gfn: Gfn) -> u64 {
        self.map.addr() + gfn * PAGE_SIZE as u64
    }

    /// Frame of a host address inside the region.
    pub fn addr_gfn(&self, addr: u64) -> Option<Gfn> {
        let off = addr.checked_sub(self.map.addr())?;
        (off < self.map.len() as u64).then_some(off / PAGE_SIZE as u64)
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True if empty (never: construction rejects 0 pages).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE as u64
    }

    /// The backing kind.
    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    /// The userfaultfd serving this region.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The destination memfd (`None` for [`RegionKind::AnonPrivate`]).
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The destination memfd as a shared file (`None` for [`RegionKind::AnonPrivate`]), for
    /// guest RAM that maps the same memory without a descriptor of its own.
    pub fn memfd_file(&self) -> Option<std::sync::Arc<std::fs::File>> {
        self.fd.clone()
    }

    /// Reads memory at byte `offset`. Missing pages fault and block until served: never call
    /// this from the thread that serves the region.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.map.read(offset as usize, buf)
    }

    /// Writes memory at byte `offset` (same blocking rule as [`read_at`](Self::read_at)).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.map.write(offset as usize, data)
    }

    /// Discards frames `[gfn, gfn + n)` (`MADV_REMOVE` on the memfd, `MADV_DONTNEED` on
    /// anonymous memory): their memory is freed and the next access faults and is served as
    /// zeros (a balloon or a reset). Blocks until the fault server has seen the event: never
    /// call it from the serving thread.
    pub fn discard(&self, gfn: Gfn, n: u64) -> Result<()> {
        let (off, len) = (gfn as usize * PAGE_SIZE, n as usize * PAGE_SIZE);
        self.map.check(off, len)?;
        let advice = if self.fd.is_some() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: the range lies inside this live mapping (checked); discarding guest memory
        // invalidates no Rust reference because none points into the mapping.
        let r = unsafe {
            libc::madvise(
                (self.map.addr() as usize + off) as *mut libc::c_void,
                len,
                advice,
            )
        };
        if r != 0 {
            return Err(io_err(format!("madvise discard of frames {gfn}+{n}")));
        }
        Ok(())
    }

    /// Marks frames `[gfn, gfn + n)` mergeable by Linux KSM (`MADV_MERGEABLE`). Only
    /// [`RegionKind::AnonPrivate`] memory can be merged: KSM ignores `MAP_SHARED` memory, so
    /// this fails for a memfd region. Merged pages stay correct: a write to one is a
    /// copy-on-write fault, not a missing-page fault, so the fault server never sees it.
    pub fn mergeable(&self, gfn: Gfn, n: u64) -> Result<()> {
        if self.kind != RegionKind::AnonPrivate {
            return Err(LazyError::Size(
                "KSM merges only anonymous private memory; create the clone with \
                 CloneOptions.anon_memory = true"
                    .into(),
            ));
        }
        let (off, len) = (gfn as usize * PAGE_SIZE, n as usize * PAGE_SIZE);
        self.map.check(off, len)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside this live anonymous mapping (checked) and is page
        // aligned; MADV_MERGEABLE changes how the kernel treats the pages, not their contents.
        let r = unsafe {
            libc::madvise(
                (self.map.addr() as usize + off) as *mut libc::c_void,
                len,
                libc::MADV_MERGEABLE,
            )
        };
        if r != 0 {
            return Err(io_err(format!(
                "madvise(MADV_MERGEABLE) of frames {gfn}+{n}"
            )));
        }
        Ok(())
    }

    /// Host memory actually allocated to the clone: the memfd's blocks, or for anonymous
    /// memory the pages `mincore` reports resident (zero-page mappings included).
    pub fn resident_bytes(&self) -> Result<u64> {
        match &self.fd {
            Some(fd) => allocated_bytes(fd.as_fd()),
            None => Ok(self.map.mincore_pages()? * PAGE_SIZE as u64),
        }
    }
}
