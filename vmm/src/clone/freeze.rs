//! Freezing a running VM's memory into a generation image with a short pause.
//!
//! - **First freeze** of a VM whose RAM is a `MAP_SHARED` memfd `F`: pause, capture vCPU and
//!   device state, map `F` again `MAP_PRIVATE` and re-point the KVM slot at that view
//!   (`Vm::swap_memory`), resume. From then on the parent's writes land in private
//!   copy-on-write pages and `F` is frozen: it *is* the image. Nothing is copied; the pause is
//!   one `mmap` and a slot delete/re-add. The image's hole scan (`SEEK_DATA`) and the unmap of
//!   the old mapping happen after the parent resumed.
//! - **Later freezes** (the parent runs on the private view of `F`): the image is `F` plus a
//!   delta layer of the pages the parent wrote since the first freeze. They are exactly the
//!   view's anonymous pages, found in `/proc/self/pagemap` and copied into a new memfd while
//!   paused (so this pause grows with the parent's dirty set, not with its memory size).
//! - A lazily served VM (clone or lazy restore) is first completed (every missing page
//!   installed while it runs) and is then frozen like a booted VM.

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Generation, MachineState};
use crate::devices::DeviceStates;
use crate::error::VmError;
use crate::lazy::{Bitmap, LayeredImage, LazyError, MemfdImage, PageSource, PAGE_SIZE};
use crate::memory::GuestRam;
use crate::prefetch::Gfn;
use crate::vm::{Vm, VmState};

static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

/// A VM's state as a parent: the frozen base image its copy-on-write view reads through.
#[derive(Default)]
pub struct ParentState {
    /// The memfd frozen by the first freeze (`None` until then).
    base: Option<Arc<DeferredImage>>,
    /// Number of freezes so far.
    freezes: u64,
}

/// A [`MemfdImage`] whose hole scan (`SEEK_DATA` over the whole memfd, proportional to its
/// size) runs on a helper thread, so that children can be created and started while it runs.
/// Until it is done, pages are read with `pread` (holes read as zeros without being allocated).
struct DeferredImage {
    pages: u64,
    file: File,
    ready: Mutex<Option<Result<Arc<MemfdImage>, String>>>,
}

impl DeferredImage {
    fn start(fd: OwnedFd, pages: u64) -> Result<Arc<DeferredImage>, VmError> {
        let file = File::from(fd.try_clone().map_err(|e| io("dup memfd", e))?);
        let me = Arc::new(DeferredImage {
            pages,
            file,
            ready: Mutex::new(None),
        });
        let target = me.clone();
        let scan = move || {
            let r = MemfdImage::new(fd, pages)
                .map(Arc::new)
                .map_err(|e| e.to_string());
            *target.ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("kscope-imgscan".into())
            .spawn(scan)
        {
            *me.ready.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Err(format!("cannot start the image scan thread: {e}")));
        }
        Ok(me)
    }

    /// The scanned image if the scan is done.
    fn done(&self) -> Option<Arc<MemfdImage>> {
        match self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(Ok(i)) => Some(i.clone()),
            _ => None,
        }
    }

    fn pread(&self, gfn: Gfn, buf: &mut [u8]) -> Result<(), LazyError> {
        if gfn + (buf.len() / PAGE_SIZE) as u64 > self.pages {
            return Err(LazyError::OutOfRange {
                gfn,
                pages: self.pages,
                what: "frozen memfd",
            });
        }
        self.file
            .read_exact_at(buf, gfn * PAGE_SIZE as u64)
            .map_err(|e| LazyError::Io {
                op: format!("pread page {gfn} of the frozen memfd"),
                source: e,
            })
    }
}

impl PageSource for DeferredImage {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<(), LazyError> {
        match self.done() {
            Some(i) => i.read_page(gfn, buf),
            None => self.pread(gfn, buf),
        }
    }

    fn read_run(&self, gfn: Gfn, buf: &mut [u8]) -> Result<(), LazyError> {
        match self.done() {
            Some(i) => i.read_run(gfn, buf),
            None => self.pread(gfn, buf),
        }
    }

    fn is_known_zero(&self, gfn: Gfn) -> bool {
        self.done().is_some_and(|i| i.is_known_zero(gfn))
    }
}

/// Where the time of a freeze went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FreezeReport {
    /// vCPUs out of the guest: from the pause request to the resume.
    pub pause: Duration,
    /// Taking the vCPUs out of the guest (pause acknowledged).
    pub stop_vcpus: Duration,
    /// Capturing vCPU and device state and the clock.
    pub capture: Duration,
    /// Memory work while paused (view swap, or dirty scan + delta copy).
    pub memory: Duration,
    /// Pages copied while paused (later freezes: the parent's dirty set).
    pub pages_copied: u64,
    /// Building the image after the resume (hole scan, old mapping release).
    pub after_resume: Duration,
    /// Completing a lazily served VM before the freeze (installing missing pages).
    pub complete: Duration,
    /// True for the first freeze (zero-copy view swap).
    pub first: bool,
}

fn io(op: &str, e: std::io::Error) -> VmError {
    VmError::Memory(format!("{op}: {e}"))
}

/// Frames whose pagemap entry says "private anonymous page" (present and not file-backed, or
/// swapped) in `[addr, addr + pages * 4096)` of this process.
pub(crate) fn private_pages(addr: u64, pages: u64) -> Result<Bitmap, VmError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let f = File::open("/proc/self/pagemap").map_err(|e| io("open /proc/self/pagemap", e))?;
    let mut map = Bitmap::new(pages);
    let chunk = 64 * 1024usize; // entries per read
    let mut buf = vec![0u8; chunk * 8];
    let mut g = 0u64;
    while g < pages {
        let n = chunk.min((pages - g) as usize);
        let b = &mut buf[..n * 8];
        f.read_exact_at(b, (addr / PAGE_SIZE as u64 + g) * 8)
            .map_err(|e| io("read /proc/self/pagemap", e))?;
        for (i, e) in b.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
            if (v & PRESENT != 0 && v & FILE == 0) || v & SWAPPED != 0 {
                map.set(g + i as u64);
            }
        }
        g += n as u64;
    }
    Ok(map)
}

/// Copy the pages set in `dirty` from `ram` into a new memfd of the same size (VM paused).
fn copy_delta(ram: &GuestRam, dirty: &Bitmap) -> Result<OwnedFd, VmError> {
    let file = new_memfd("kscope-delta", ram.size())?;
    let base = ram.host_addr();
    let flush = |start: Gfn, n: usize| -> Result<(), VmError> {
        let off = start as usize * PAGE_SIZE;
        // SAFETY: `[off, off + n pages)` lies inside `ram`'s live mapping (frames come from
        // a bitmap of `ram`'s size); the VM is paused, so nothing writes the range while the
        // kernel copies it into the file.
        let src = unsafe { std::slice::from_raw_parts(base.add(off), n * PAGE_SIZE) };
        file.write_all_at(src, off as u64)
            .map_err(|e| io("write delta memfd", e))
    };
    let mut run: Option<(Gfn, usize)> = None;
    for g in dirty.iter_set() {
        run = match run {
            Some((s, n)) if s + n as u64 == g && n < 256 => Some((s, n + 1)),
            Some((s, n)) => {
                flush(s, n)?;
                Some((g, 1))
            }
            None => Some((g, 1)),
        };
    }
    if let Some((s, n)) = run {
        flush(s, n)?;
    }
    Ok(OwnedFd::from(file))
}

/// A new, empty memfd of `len` bytes.
pub(crate) fn new_memfd(name: &str, len: u64) -> Result<File, VmError> {
    let cname = std::ffi::CString::new(name).map_err(|e| VmError::Internal(e.to_string()))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).map_err(|e| io("size memfd", e))?;
    Ok(f)
}

/// Drop the page table entries of a `MAP_SHARED` guest RAM mapping nobody uses any more, 32 MiB
/// at a time (`MADV_DONTNEED` takes the mmap lock shared, per chunk). The file keeps the data.
fn release_page_tables(ram: &GuestRam) {
    if ram.is_private() {
        return;
    }
    const CHUNK: usize = 32 << 20;
    let len = ram.size() as usize;
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        // SAFETY: the range lies inside `ram`'s live shared mapping, which no longer backs the
        // KVM slot; dropping PTEs of a shared file mapping leaves the file's contents intact,
        // and any remaining reader simply faults the pages back in from the file.
        unsafe { libc::madvise(ram.host_addr().add(off).cast(), n, libc::MADV_DONTNEED) };
        off += n;
    }
}

fn dup(f: &File) -> Result<OwnedFd, VmError> {
    f.as_fd()
        .try_clone_to_owned()
        .map_err(|e| io("dup memfd", e))
}

/// Bytes of host memory owned by this VM alone (see [`super::MemoryStats::footprint_bytes`]).
pub(crate) fn footprint(vm: &Vm) -> Result<u64, VmError> {
    if let Some(s) = &vm.lazy {
        if vm
            .parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .base
            .is_none()
        {
            return Ok(s.region().resident_bytes()?);
        }
    }
    let ram = vm.memory.load();
    if ram.is_private() {
        let pages = ram.size() / PAGE_SIZE as u64;
        return Ok(private_pages(ram.host_addr() as u64, pages)?.count() * PAGE_SIZE as u64);
    }
    let file = ram.file().ok_or_else(|| {
        VmError::Internal("anonymous guest RAM outside a lazily served clone".into())
    })?;
    let m = file.metadata().map_err(|e| io("fstat memfd", e))?;
    Ok(std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

impl Vm {
    /// Capture the device state (VM paused).
    pub fn save_device_states(&self) -> Result<DeviceStates, VmError> {
        self.require_paused("save device state")?;
        Ok(DeviceStates {
            serial: self
                .devices
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
            block: self
                .devices
                .block
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
            request: self
                .devices
                .request
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
            net: self
                .devices
                .net
                .as_ref()
                .map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).save_state()),
        })
    }

    /// Capture the whole machine state (VM paused).
    pub fn save_machine_state(&self) -> Result<MachineState, VmError> {
        Ok(MachineState {
            vcpus: self.save_vcpu_states()?,
            devices: self.save_device_states()?,
            clock: self.hv.clock().ok(),
            ready_value: self.boot_report().map_or(0, |r| r.ready_value),
        })
    }

    /// Freeze the VM's current memory and machine state as a generation image (see the
    /// module docs). A running VM is paused briefly; a paused VM stays paused.
    pub fn freeze(&self) -> Result<(Arc<Generation>, FreezeReport), VmError> {
        let mut rep = FreezeReport::default();
        match self.state() {
            VmState::Running | VmState::Paused => {}
            other => {
                return Err(VmError::BadState {
                    op: "clone or snapshot",
                    state: format!("{other:?}"),
                })
            }
        }
        if self.memory.load().is_anonymous() {
            return Err(VmError::BadConfig(format!(
                "{} is an anon-memory clone (CloneOptions.anon_memory), which cannot be frozen, \
                 cloned or snapshotted; clone its parent with anon_memory: false instead",
                self.name()
            )));
        }
        let mut ps = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        if ps.base.is_none() {
            if let Some(server) = &self.lazy {
                // Complete the lazily served memory while the VM runs.
                let t = Instant::now();
                let all: Vec<Gfn> = (0..server.region().pages()).collect();
                server.install(&all)?;
                rep.complete = t.elapsed();
            }
        }
        let was_paused = self.state() == VmState::Paused;
        let t0 = Instant::now();
        if !was_paused {
            self.pause()?;
        }
        rep.stop_vcpus = t0.elapsed();
        let result = self.freeze_paused(&mut ps, &mut rep);
        if !was_paused {
            self.resume()?;
        }
        rep.pause = t0.elapsed();
        let (state, pending) = result?;
        let t1 = Instant::now();
        let image: Arc<dyn PageSource> = match pending {
            Pending::First { file, old } => {
                // Unmapping the old shared mapping costs time proportional to its populated
                // pages and holds the process's mmap lock throughout, stalling every mmap
                // (new clones) meanwhile: drop its page tables in small chunks first, on a
                // short-lived thread, then unmap the empty range.
                let reaper = std::thread::Builder::new()
                    .name("kscope-unmap".into())
                    .spawn(move || {
                        release_page_tables(&old);
                        drop(old);
                    });
                if let Err(e) = reaper {
                    tracing::debug!("no unmap thread ({e}); unmapping inline");
                }
                let base = DeferredImage::start(dup(&file)?, self.pages())?;
                ps.base = Some(base.clone());
                base
            }
            Pending::Later { base, delta, dirty } => {
                let mut img = LayeredImage::new(base);
                img.push(Arc::new(MemfdImage::new(delta, self.pages())?), dirty)?;
                Arc::new(img)
            }
        };
        ps.freezes += 1;
        rep.after_resume = t1.elapsed();
        let generation = Arc::new(Generation {
            id: NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed),
            image,
            state,
            cfg: self.cfg.clone(),
            created: Instant::now(),
        });
        Ok((generation, rep))
    }

    fn pages(&self) -> u64 {
        self.mem_bytes() / PAGE_SIZE as u64
    }

    fn freeze_paused(
        &self,
        ps: &mut ParentState,
        rep: &mut FreezeReport,
    ) -> Result<(MachineState, Pending), VmError> {
        let t = Instant::now();
        let state = self.save_machine_state()?;
        rep.capture = t.elapsed();
        let t = Instant::now();
        let ram = self.memory.load();
        let pending = match &ps.base {
            None => {
                if ram.is_private() {
                    return Err(VmError::Internal(
                        "guest RAM is a private view without a frozen base".into(),
                    ));
                }
                let file = ram
                    .file()
                    .ok_or_else(|| {
                        VmError::Internal("anonymous guest RAM cannot be frozen".into())
                    })?
                    .clone();
                let view = GuestRam::from_file(file.clone(), ram.size(), libc::MAP_PRIVATE)?;
                let old = self.swap_memory(view)?;
                drop(ram);
                rep.first = true;
                Pending::First { file, old }
            }
            Some(base) => {
                let dirty = private_pages(ram.host_addr() as u64, self.pages())?;
                let delta = copy_delta(&ram, &dirty)?;
                rep.pages_copied = dirty.count();
                Pending::Later {
                    base: base.clone(),
                    delta,
                    dirty,
                }
            }
        };
        rep.memory = t.elapsed();
        Ok((state, pending))
    }
}

/// Memory work left for after the resume.
enum Pending {
    First {
        file: Arc<File>,
        old: Arc<GuestRam>,
    },
    Later {
        base: Arc<DeferredImage>,
        delta: OwnedFd,
        dirty: Bitmap,
    },
}
