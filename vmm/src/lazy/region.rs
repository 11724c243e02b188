//! A clone's destination memory: a memfd (or anonymous memory) from [`crate::hostmem`],
//! registered with userfaultfd.

use std::os::fd::{AsFd, BorrowedFd};

use super::{io_at, LazyError, Result};
use crate::hostmem::{allocated_bytes, memfd_create, Gfn, Mapping, PAGE_SIZE};
use crate::uffd::{features, RegisterMode, Uffd};

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
                let fd =
                    memfd_create(c"kscope-clone", len as u64).map_err(io_at("memfd_create"))?;
                let map = Mapping::new(Some(fd.as_fd()), len, true, true)
                    .map_err(io_at("mmap of the clone memfd"))?;
                (Some(std::sync::Arc::new(std::fs::File::from(fd))), map)
            }
            RegionKind::AnonPrivate => (
                None,
                Mapping::new(None, len, true, false)
                    .map_err(io_at("mmap of anonymous clone memory"))?,
            ),
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
        self.map
            .read(offset as usize, buf)
            .map_err(io_at("read clone memory"))
    }

    /// Writes memory at byte `offset` (same blocking rule as [`read_at`](Self::read_at)).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.map
            .write(offset as usize, data)
            .map_err(io_at("write clone memory"))
    }

    /// Discards frames `[gfn, gfn + n)` (`MADV_REMOVE` on the memfd, `MADV_DONTNEED` on
    /// anonymous memory): their memory is freed and the next access faults and is served as
    /// zeros (a balloon or a reset). Blocks until the fault server has seen the event: never
    /// call it from the serving thread.
    pub fn discard(&self, gfn: Gfn, n: u64) -> Result<()> {
        let (off, len) = (gfn as usize * PAGE_SIZE, n as usize * PAGE_SIZE);
        let advice = if self.fd.is_some() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // Discarding guest memory invalidates no Rust reference: none points into the mapping.
        self.map
            .advise(off, len, advice)
            .map_err(io_at(format!("madvise discard of frames {gfn}+{n}")))
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
        self.map
            .advise(off, len, libc::MADV_MERGEABLE)
            .map_err(io_at(format!(
                "madvise(MADV_MERGEABLE) of frames {gfn}+{n}"
            )))
    }

    /// Host memory actually allocated to the clone: the memfd's blocks, or for anonymous
    /// memory the pages `mincore` reports resident (zero-page mappings included).
    pub fn resident_bytes(&self) -> Result<u64> {
        match &self.fd {
            Some(fd) => allocated_bytes(fd.as_fd()).map_err(io_at("fstat clone memfd")),
            None => Ok(self.map.mincore_pages().map_err(io_at("mincore"))? * PAGE_SIZE as u64),
        }
    }
}
