//! Freezing a running VM's memory into a generation image with a short pause.
//!
//! - **First freeze** of a VM whose RAM is a `MAP_SHARED` memfd `F`: from then on the parent
//!   runs on a `MAP_PRIVATE` view of `F`, its writes land in private copy-on-write pages and
//!   `F` is frozen: it *is* the image. Nothing is copied. The parent moves onto a *standby*
//!   KVM VM whose slot already maps the view ([`super::rehome`]): the pause captures the
//!   vCPU and device state and loads it into the standby's vCPUs, and does not depend on
//!   memory size. (The method before, kept as a baseline, re-points the VM's own slot at the
//!   view while paused, `Vm::swap_memory`: KVM then drops every shadow mapping inside the
//!   pause.) The image's hole scan (`SEEK_DATA`), the old KVM VM's teardown and the unmap of
//!   the old mapping happen after the parent resumed.
//! - **Later freezes** (the parent runs on the private view of `F`): the image is `F` plus a
//!   delta layer of the pages the parent wrote since the first freeze. They are exactly the
//!   view's anonymous pages. They are captured copy-on-write ([`super::cow`]): while paused
//!   they are found with `PAGEMAP_SCAN` and write-protected through a userfaultfd, and copied
//!   after the resume; a parent write to a page not yet copied waits for its copy. Nothing is
//!   copied while paused. Where the kernel refuses write-protection on the view, the pages are
//!   copied into a new memfd while paused instead (the pause then grows with the dirty set).
//! - A lazily served VM (clone or lazy restore) is first completed (every missing page
//!   installed while it runs) and is then frozen like a booted VM.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::cow::{CowLayer, CowTracker};
use super::rehome::{Retired, Retiring, Standby};
use crate::error::VmError;
use crate::generation::{FreezeReport, Generation, ParentState};
use crate::hostmem::{memfd_create, Gfn, PAGE_SIZE};
use crate::lazy::{Bitmap, DeferredImage, LayeredImage, MemfdImage, PageSource};
use crate::lifecycle::{VmOp, VmState};
use crate::memory::{private_pages, GuestRam};
use crate::state::MachineState;
use crate::vm::Vm;

static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

fn io(op: &str, e: std::io::Error) -> VmError {
    VmError::Memory(format!("{op}: {e}"))
}

/// Copy the pages set in `dirty` from `ram` into a new memfd of the same size (VM paused).
fn copy_delta(ram: &GuestRam, dirty: &Bitmap) -> Result<OwnedFd, VmError> {
    let file =
        File::from(memfd_create(c"kscope-delta", ram.size()).map_err(|e| io("memfd_create", e))?);
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

/// Drop the page table entries of a `MAP_SHARED` guest RAM mapping nobody uses any more, 32 MiB
/// at a time (`MADV_DONTNEED` takes the mmap lock shared, per chunk). The file keeps the data.
pub(super) fn release_page_tables(ram: &GuestRam) {
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

impl Vm {
    /// Freeze the VM's current memory and machine state as a generation image (see the
    /// module docs). A running VM is paused briefly; a paused VM stays paused. Spawn children
    /// from the result with [`Generation::spawn`]; the report is
    /// [`Generation::freeze_report`].
    pub fn freeze(&self) -> Result<Arc<Generation>, VmError> {
        let (generation, chores) = self.freeze_staged()?;
        chores.run();
        Ok(generation)
    }

    /// [`Vm::freeze`], leaving the chores of a first freeze ([`Chores`]) to the caller, who
    /// runs them once its children are made ([`Vm::clone_children`]) or drops them (which
    /// runs them too).
    pub(crate) fn freeze_staged(&self) -> Result<(Arc<Generation>, Chores), VmError> {
        let mut chores = Chores::default();
        let mut rep = FreezeReport::default();
        self.check_op(VmOp::Freeze)?;
        if self.memory.load().is_anonymous() {
            return Err(VmError::BadConfig(format!(
                "{} is an anon-memory clone (CloneOptions.anon_memory), which cannot be frozen, \
                 cloned or snapshotted; clone its parent with anon_memory: false instead",
                self.name()
            )));
        }
        let mut ps = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cow) = ps.cow.as_mut() {
            // The previous layer finishes its copy before this pause.
            let t = Instant::now();
            cow.settle();
            rep.settle = t.elapsed();
        }
        if ps.base.is_none() {
            if let Some(server) = &self.lazy {
                // Complete the lazily served memory while the VM runs.
                let t = Instant::now();
                let all: Vec<Gfn> = (0..server.region().pages()).collect();
                server.install(&all)?;
                rep.complete = t.elapsed();
            }
        }
        if ps.base.is_none() && !ps.repoint_first && ps.standby.is_none() {
            // The standby VM of the first freeze, unless made ahead (`prepare_freeze`).
            // If it cannot be made (descriptor or memory limits), the slot is re-pointed
            // instead: a longer pause, not a failed clone.
            let t = Instant::now();
            match Standby::prepare(
                self.name(),
                &self.memory.load(),
                self.cfg.vcpus,
                !ps.full_layers,
            ) {
                Ok(s) => ps.standby = Some(s),
                Err(e) => tracing::warn!(
                    vm = %self.name(),
                    "no standby VM for the first freeze ({e}); re-pointing the memory slot \
                     while paused instead (a pause that grows with the populated memory)"
                ),
            }
            rep.prepare = t.elapsed();
        }
        // Read the host CPU (CPUID, which may exit to an outer hypervisor) before the pause;
        // the capture below then finds it cached.
        crate::state::HostCpu::current();
        let was_paused = self.state() == VmState::Paused;
        let t0 = Instant::now();
        // Each vCPU saves its state as it acknowledges the pause (one round trip); on a move
        // onto the standby, the vCPU threads then poll for their swap and resume.
        let saved = if was_paused {
            None
        } else {
            let rehoming = ps.base.is_none() && ps.standby.is_some();
            Some(self.pause_and_save(rehoming)?)
        };
        rep.stop_vcpus = t0.elapsed();
        let result = self.freeze_paused(&mut ps, &mut rep, saved);
        let resumed = if was_paused { Ok(()) } else { self.resume() };
        rep.pause = t0.elapsed();
        // Pages write-protected by the capture are copied and served whatever happens next:
        // a protected page without its handler would block the parent's writes forever.
        let launched = match (&result, ps.cow.as_mut()) {
            (Ok((_, Pending::Cow { base, layer })), Some(cow)) => {
                Some(cow.launch(layer.clone(), base))
            }
            _ => None,
        };
        resumed?;
        let (state, pending) = result?;
        let t1 = Instant::now();
        let image: Arc<dyn PageSource> = match pending {
            Pending::First { file, old } => {
                // Tearing down the old KVM VM and unmapping the old shared mapping cost time
                // proportional to the populated pages: on a thread, after the resume (and
                // after the children of the call are made).
                chores.retired = Some(old);
                let base = DeferredImage::new(dup(&file)?, self.pages());
                chores.scan = Some(base.clone());
                ps.base = Some(base.clone());
                // Later freezes capture copy-on-write through write-protection of the view
                // (registered with the standby VM ahead of time, or now after a re-point).
                if !rep.rehomed {
                    ps.cow = CowTracker::try_new(self.memory.load(), self.name(), false);
                }
                base
            }
            Pending::Cow { layer, .. } => {
                // Stacked and handed to the handler thread right after the resume.
                rep.pages_protected = layer.present().count();
                rep.full_layer = layer.is_full();
                rep.recorded = layer.is_recorded();
                let image = launched.ok_or_else(|| {
                    VmError::Internal("copy-on-write layer without its tracker".into())
                })??;
                rep.layers = image.depth() as u64 - 1;
                image
            }
            Pending::Later { base, delta, dirty } => {
                let mut img = LayeredImage::new(base);
                img.push(Arc::new(MemfdImage::new(delta, self.pages())?), dirty)?;
                if let Some(cow) = ps.cow.as_mut() {
                    cow.adopt(img.clone(), rep.pages_copied);
                }
                rep.full_layer = true;
                rep.layers = 1;
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
            freeze: rep,
        });
        Ok((generation, chores))
    }

    /// Later freezes of this VM copy the parent's dirty pages while it is paused (`true`),
    /// the method before copy-on-write capture, kept as a baseline for benchmarks; `false`
    /// (the default) captures them copy-on-write. Takes effect at the next freeze.
    pub fn set_capture_by_copy(&self, copy: bool) {
        let mut ps = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        ps.copy_while_paused = copy;
    }

    /// Every later freeze of this VM captures all the pages the parent wrote since its first
    /// freeze (`true`: the method before incremental layers, kept as a baseline for
    /// benchmarks; the pause then grows with them) or only those written since its previous
    /// freeze (`false`, the default; see [`super::cow`]). Takes effect at the next freeze.
    pub fn set_full_layers(&self, full: bool) {
        let mut ps = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        ps.full_layers = full;
    }

    /// The first freeze of this VM re-points its KVM memory slot at the private view while
    /// paused (`true`: the method before the standby VM, kept as a baseline for benchmarks;
    /// the pause then grows with the populated memory) or moves the VM onto a standby VM
    /// (`false`, the default; see [`super::rehome`]). Takes effect at the first freeze.
    pub fn set_first_freeze_by_repoint(&self, repoint: bool) {
        let mut ps = self.parent.lock().unwrap_or_else(|p| p.into_inner());
        ps.repoint_first = repoint;
        if repoint {
            ps.standby = None;
        }
    }

    fn pages(&self) -> u64 {
        self.mem_bytes() / PAGE_SIZE as u64
    }

    fn freeze_paused(
        &self,
        ps: &mut ParentState,
        rep: &mut FreezeReport,
        vcpus: Option<Vec<crate::hypervisor::VcpuState>>,
    ) -> Result<(MachineState, Pending), VmError> {
        let t = Instant::now();
        let state = self.capture_state(vcpus)?;
        rep.capture = t.elapsed();
        let t = Instant::now();
        let ram = self.memory.load();
        let copy = ps.copy_while_paused;
        // The standby's write-protect tracker, once the VM runs on its view.
        let mut tracker = None;
        let pending = match (&ps.base, ps.cow.as_mut()) {
            (None, _) => {
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
                drop(ram);
                let old = match ps.standby.take() {
                    Some(mut standby) => {
                        let cow = standby.take_cow();
                        let old = self.rehome(standby, &state)?;
                        rep.rehomed = true;
                        tracker = cow;
                        old
                    }
                    None => {
                        let view =
                            GuestRam::from_file(file.clone(), self.mem_bytes(), libc::MAP_PRIVATE)?;
                        Retiring::done(Retired::mapping(self.swap_memory(view)?))
                    }
                };
                rep.first = true;
                Pending::First { file, old }
            }
            (Some(base), Some(cow)) if !copy => {
                cow.set_incremental(!ps.full_layers);
                Pending::Cow {
                    base: base.clone(),
                    layer: cow.capture(self.name())?,
                }
            }
            (Some(base), _) => {
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
        if tracker.is_some() {
            ps.cow = tracker;
        }
        rep.memory = t.elapsed();
        Ok((state, pending))
    }
}

/// Work a first freeze leaves for after the children of its call are made, which the clone
/// call need not wait for: taking the old vCPUs back from the vCPU threads (they hand them
/// over as they resume), releasing them with the old KVM VM and mapping, and starting the
/// image's hole scan (each a thread). Run by [`Chores::run`] or on drop.
#[derive(Default)]
pub(crate) struct Chores {
    retired: Option<Retiring>,
    scan: Option<Arc<DeferredImage>>,
}

impl Chores {
    /// Starts the work now.
    pub(crate) fn run(mut self) {
        self.start();
    }

    fn start(&mut self) {
        if let Some(old) = self.retired.take() {
            // The vCPU threads hand their old vCPUs back as they resume; one that could not
            // take its new vCPU had ended (the VM is stopping, which reports it).
            match old.collect() {
                Ok(retired) => retired.release(),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if let Some(image) = self.scan.take() {
            image.start_scan();
        }
    }
}

impl Drop for Chores {
    fn drop(&mut self) {
        self.start();
    }
}

/// Memory work left for after the resume.
enum Pending {
    First {
        file: Arc<File>,
        old: Retiring,
    },
    Later {
        base: Arc<DeferredImage>,
        delta: OwnedFd,
        dirty: Bitmap,
    },
    Cow {
        base: Arc<DeferredImage>,
        layer: Arc<CowLayer>,
    },
}
