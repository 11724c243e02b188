//! Guest RAM: one region at GPA 0 backed by a memfd, mapped `MAP_SHARED` into the VMM.
//!
//! The memfd is kept so that cloning can later freeze it as a copy-on-write generation image.
//! [`GuestMemory`] holds the *current* [`GuestRam`] behind a lock so that the backing mapping
//! can be swapped while the VM's vCPUs are paused (the VM re-points the KVM slot at the same
//! time); readers take a cheap `Arc` snapshot per access.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::hostmem::PAGE_SIZE;
use crate::lazy::{Bitmap, StatsSnapshot};

use crate::error::VmError;
use kscope_guest::abi::layout::{LARGE_PAGE_SIZE, MAX_GUEST_RAM};

/// Reads of shared RAM at least this large go through the memfd (see [`GuestRam::read`]).
const BULK_READ: usize = 1 << 20;

/// Smallest guest RAM the boot layout supports (boot structures + kernel).
pub const MIN_GUEST_RAM: u64 = 4 << 20;

/// Check a RAM size against the layout: a multiple of 2 MiB, at least [`MIN_GUEST_RAM`], and
/// ending below the MMIO window.
pub fn validate_size(size: u64) -> Result<(), VmError> {
    if size < MIN_GUEST_RAM {
        return Err(VmError::BadConfig(format!(
            "mem_bytes {size:#x} is below the minimum of {MIN_GUEST_RAM:#x} (4 MiB)"
        )));
    }
    if !size.is_multiple_of(LARGE_PAGE_SIZE) {
        return Err(VmError::BadConfig(format!(
            "mem_bytes {size:#x} is not a multiple of 2 MiB; round it to a 2 MiB boundary"
        )));
    }
    if size > MAX_GUEST_RAM {
        return Err(VmError::BadConfig(format!(
            "mem_bytes {size:#x} overlaps the MMIO window at {MAX_GUEST_RAM:#x}; use at most 8 GiB"
        )));
    }
    Ok(())
}

/// Something that keeps a mapping not owned by a [`GuestRam`] alive (e.g. the fault server
/// of a lazily served clone, which owns the registered mapping).
pub struct Keeper(pub Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keeper")
    }
}

/// One mapping of guest RAM `[0, size)` and the file behind it (none for anonymous memory).
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    file: Option<Arc<File>>,
    size: u64,
    host_addr: usize,
    /// MAP_SHARED or MAP_PRIVATE.
    flags: i32,
    /// Owner of a borrowed mapping (dropped after `mem`).
    _keep: Option<Keeper>,
}

impl GuestRam {
    /// Create fresh, zeroed guest RAM of `size` bytes on a new memfd named `name`, mapped
    /// `MAP_SHARED`.
    pub fn new(name: &str, size: u64) -> Result<GuestRam, VmError> {
        validate_size(size)?;
        let cname = CString::new(format!("kscope-ram-{name}").replace('\0', "_"))
            .map_err(|e| VmError::BadConfig(format!("VM name: {e}")))?;
        let fd = crate::hostmem::memfd_create(&cname, size).map_err(|e| {
            VmError::Memory(format!("memfd_create of {size:#x} bytes of guest RAM: {e}"))
        })?;
        let file = File::from(fd);
        Self::from_file(Arc::new(file), size, libc::MAP_SHARED)
    }

    /// Map `size` bytes of `file` (from offset 0) as guest RAM with `flags` (`MAP_SHARED`, or
    /// `MAP_PRIVATE` for a copy-on-write view of a frozen image).
    pub fn from_file(file: Arc<File>, size: u64, flags: i32) -> Result<GuestRam, VmError> {
        validate_size(size)?;
        let len = usize::try_from(size).map_err(|_| VmError::BadConfig("mem_bytes".into()))?;
        let region: MmapRegion = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
        )
        .map_err(|e| {
            VmError::Internal(format!("mmap of guest RAM ({size:#x} bytes) failed: {e}"))
        })?;
        Self::wrap(region, Some(file), size, flags, None)
    }

    /// Guest RAM over an existing mapping owned by `keep` (e.g. a clone's userfaultfd-served
    /// region: KVM and the devices must use the registered mapping itself).
    ///
    /// # Safety
    ///
    /// `[addr, addr + size)` must be a live, writable `MAP_SHARED` mapping of `file` that
    /// `keep` keeps mapped for as long as it lives.
    pub unsafe fn from_raw(
        addr: *mut u8,
        size: u64,
        file: Arc<File>,
        keep: Keeper,
    ) -> Result<GuestRam, VmError> {
        validate_size(size)?;
        let len = usize::try_from(size).map_err(|_| VmError::BadConfig("mem_bytes".into()))?;
        // SAFETY: the caller guarantees a live mapping of `len` bytes at `addr` with these
        // protections and flags, kept alive by `keep`, which the returned value owns.
        let region = unsafe {
            MmapRegion::build_raw(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| VmError::Internal(format!("guest region over {addr:p}: {e}")))?;
        Self::wrap(region, Some(file), size, libc::MAP_SHARED, Some(keep))
    }

    /// Guest RAM over an existing anonymous private mapping owned by `keep` (a clone whose
    /// userfaultfd-served memory is `MAP_PRIVATE | MAP_ANONYMOUS`, which KSM can merge). Such
    /// RAM has no [`file`](Self::file) and cannot be frozen.
    ///
    /// # Safety
    ///
    /// `[addr, addr + size)` must be a live, writable anonymous `MAP_PRIVATE` mapping that
    /// `keep` keeps mapped for as long as it lives.
    pub unsafe fn from_raw_anon(
        addr: *mut u8,
        size: u64,
        keep: Keeper,
    ) -> Result<GuestRam, VmError> {
        validate_size(size)?;
        let len = usize::try_from(size).map_err(|_| VmError::BadConfig("mem_bytes".into()))?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: the caller guarantees a live anonymous mapping of `len` bytes at `addr` with
        // these protections and flags, kept alive by `keep`, which the returned value owns.
        let region =
            unsafe { MmapRegion::build_raw(addr, len, libc::PROT_READ | libc::PROT_WRITE, flags) }
                .map_err(|e| VmError::Internal(format!("guest region over {addr:p}: {e}")))?;
        Self::wrap(region, None, size, flags, Some(keep))
    }

    fn wrap(
        region: MmapRegion,
        file: Option<Arc<File>>,
        size: u64,
        flags: i32,
        keep: Option<Keeper>,
    ) -> Result<GuestRam, VmError> {
        let host_addr = region.as_ptr() as usize;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmError::Internal("guest region overflow".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| VmError::Internal(format!("guest memory: {e}")))?;
        Ok(GuestRam {
            mem,
            file,
            size,
            host_addr,
            flags,
            _keep: keep,
        })
    }

    /// True if the mapping is `MAP_PRIVATE` (a copy-on-write view of its file).
    pub fn is_private(&self) -> bool {
        self.flags & libc::MAP_PRIVATE != 0
    }

    /// The vm-memory view (for virtio-queue and loaders).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The file backing guest RAM (`None` for anonymous memory, see
    /// [`from_raw_anon`](Self::from_raw_anon)).
    pub fn file(&self) -> Option<&Arc<File>> {
        self.file.as_ref()
    }

    /// True if guest RAM is anonymous memory without a file.
    pub fn is_anonymous(&self) -> bool {
        self.file.is_none()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of GPA 0 (for the KVM memory slot and userfaultfd).
    pub fn host_addr(&self) -> *mut u8 {
        self.host_addr as *mut u8
    }

    /// Read guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.check(gpa, buf.len())?;
        // A large read of shared RAM goes through its file: the same bytes, but holes read as
        // zeros without the mapping allocating a page for each (reading a whole 4 GiB guest
        // through the mapping allocated 4 GiB of shmem and took 31 s).
        if let (Some(file), true) = (&self.file, self.flags == libc::MAP_SHARED) {
            if buf.len() >= BULK_READ {
                return file.read_exact_at(buf, gpa).map_err(|e| {
                    VmError::Memory(format!(
                        "reading {} bytes of guest RAM at {gpa:#x}: {e}",
                        buf.len()
                    ))
                });
            }
        }
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| VmError::GuestMemory {
                gpa,
                len: buf.len(),
            })
    }

    /// Write `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.check(gpa, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| VmError::GuestMemory {
                gpa,
                len: data.len(),
            })
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), VmError> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VmError::GuestMemory { gpa, len }),
        }
    }
}

/// The current guest RAM of a VM, swappable while the VM is paused.
#[derive(Debug)]
pub struct GuestMemory {
    current: RwLock<Arc<GuestRam>>,
}

impl GuestMemory {
    /// Wrap `ram`.
    pub fn new(ram: GuestRam) -> GuestMemory {
        GuestMemory {
            current: RwLock::new(Arc::new(ram)),
        }
    }

    /// A snapshot of the current RAM.
    pub fn load(&self) -> Arc<GuestRam> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the current RAM (the caller re-points the hypervisor's slot); returns the old.
    pub fn replace(&self, ram: Arc<GuestRam>) -> Arc<GuestRam> {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *cur, ram)
    }
}

/// Memory counters of a VM (see [`crate::Vm::memory_stats`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    /// True for a lazily served clone or restored VM.
    pub lazy: bool,
    /// Faults served.
    pub faults: u64,
    /// Faulting pages installed with data.
    pub pages_fetched: u64,
    /// Pages installed ahead of a fault (prefetch, before resume, background).
    pub pages_prefetched: u64,
    /// Pages installed as zeros.
    pub zero_filled: u64,
    /// Bytes copied into the VM's memory.
    pub bytes: u64,
    /// Total time vCPUs (or VMM threads) were blocked in faults.
    pub blocked: Duration,
    /// Median fault service time.
    pub fault_p50: Duration,
    /// 99th percentile fault service time.
    pub fault_p99: Duration,
    /// Host memory owned by this VM alone: allocated blocks of its memfd, or for a parent on a
    /// copy-on-write view, its private (written since the freeze) pages.
    pub footprint_bytes: u64,
    /// The full fault-server statistics (lazy VMs).
    pub server: Option<StatsSnapshot>,
}

impl MemoryStats {
    /// The counters of a lazily served VM from its fault server's statistics.
    pub fn of_lazy(s: StatsSnapshot, footprint_bytes: u64) -> MemoryStats {
        MemoryStats {
            lazy: true,
            faults: s.faults,
            pages_fetched: s.fault_pages,
            pages_prefetched: s.prefetched + s.before_resume + s.background,
            zero_filled: s.zero_filled,
            bytes: s.bytes_copied,
            blocked: Duration::from_nanos(s.fault_ns_total),
            fault_p50: Duration::from_nanos(s.fault_ns_p50),
            fault_p99: Duration::from_nanos(s.fault_ns_p99),
            footprint_bytes,
            server: Some(s),
        }
    }
}

/// Frames holding private anonymous pages (present and not file-backed, or swapped) in
/// `[addr, addr + pages * 4096)` of this process ([`crate::pagemap::anon_ranges`]).
pub(crate) fn private_pages(addr: u64, pages: u64) -> Result<Bitmap, VmError> {
    let end = addr + pages * PAGE_SIZE as u64;
    let ranges = crate::pagemap::anon_ranges(addr, end)
        .map_err(|e| VmError::Memory(format!("finding the pages written since the freeze: {e}")))?;
    let mut map = Bitmap::new(pages);
    for (s, e) in ranges {
        map.set_range((s - addr) / PAGE_SIZE as u64, (e - addr) / PAGE_SIZE as u64);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(validate_size(64 << 20).is_ok());
        assert!(validate_size((64 << 20) + 4096).is_err());
        assert!(validate_size(2 << 20).is_err());
        assert!(validate_size(MAX_GUEST_RAM + (2 << 20)).is_err());
        assert!(validate_size(MAX_GUEST_RAM).is_ok());
    }

    #[test]
    fn ram_is_shared_with_its_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new("t", 4 << 20).unwrap();
        ram.write(0x1234, b"hello").unwrap();
        let mut buf = [0u8; 5];
        ram.file().unwrap().read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(ram.write((4 << 20) - 2, b"abc").is_err());
        let mut b = [0u8; 5];
        ram.read(0x1234, &mut b).unwrap();
        assert_eq!(&b, b"hello");
    }
}
