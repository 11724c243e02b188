//! Copy-on-write capture of a parent's later generations: nothing is copied while the parent
//! is paused, and only what it wrote since its previous freeze is even looked at.
//!
//! After its first freeze a parent runs on a private view of its frozen memfd (the *base*),
//! so the pages it wrote since are exactly the view's anonymous pages. The view is registered
//! in a userfaultfd's write-protect mode ([`CowTracker`]), and captured pages **stay**
//! write-protected after they are copied, so the protection itself tells what the parent
//! writes next. Two ways to know it:
//!
//! - **Recorded** (the standby VM's tracker, [`CowTracker::new_recording`]): the whole view is
//!   protected before the parent moves onto it, so every write goes through the handler
//!   thread, which records its [`LIFT`]-page block and lifts its protection. A later freeze
//!   takes that record: no page-table scan.
//! - **Scanned** (a tracker made after the parent runs on the view): a later freeze finds the
//!   anonymous pages not protected (`PAGE_IS_WRITTEN` of `PAGEMAP_SCAN`, [`crate::pagemap`]).
//!
//! Either way the freeze, while paused, protects those pages again (a few ioctls: nearby runs
//! merged) and publishes the layer; the parent resumes. The generation's image is the
//! previous one with one more layer on top, holding those pages ([`LayeredImage`]: base, then
//! layers newest first). The handler thread (one per parent, for its life) copies the new
//! layer into its memfd in [`CHUNK`]-page chunks, and serves the parent's write faults on
//! protected pages: it copies the faulting page's chunk first if it is not copied yet, then
//! lifts the protection of the page's block, which wakes the writer. A child (or anything
//! else) that reads a page of the layer before the handler reached it copies the chunk
//! itself, under the same lock, so every reader sees the page as it was at the freeze.
//!
//! A page the parent did not write since an earlier capture is still protected, so its
//! content equals that earlier layer's copy: it is read from there. The first capture takes
//! all anonymous pages (a *full* layer over the base), and so does a capture once
//! [`MAX_LAYERS`] layers are stacked (which bounds the layers a child's page read looks
//! through) or once the stacked layers hold more pages than the full one (the parent keeps
//! its latest chain, so this bounds what it keeps to twice its written pages). The layers of
//! one chain share one memfd. This relies on the VMM never discarding pages of the view
//! (`MADV_DONTNEED`), which would make an earlier layer's copy stale; it does not.
//!
//! A layer whose copy fails (out of memory for the memfd) keeps lifting protection on
//! faults: the parent never hangs, and readers of the failed range get the error, which
//! fails their VM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::VmError;
use crate::hostmem::{memfd_create, Gfn, PAGE_SIZE};
use crate::lazy::{AtomicBitmap, Bitmap, DeferredImage, LayeredImage, LazyError, PageSource};
use crate::memory::GuestRam;
use crate::uffd::{features, Event, RegisterMode, Uffd};

/// Pages per copy chunk (one word of a layer's page bitmap, aligned): a parent write waits for
/// at most this many page copies.
const CHUNK: u64 = 64;
/// Pages released together by a write fault (an aligned block; a divisor of [`CHUNK`]): a
/// parent that writes pages next to each other then faults once per block, not per page
/// (each fault is a round trip through the handler thread, ~0.2 ms here), at the price of
/// capturing the block's other pages too. Measured: `docs/BENCHMARKS.md` §10.
const LIFT: u64 = 16;
/// Written runs separated by at most this many pages are protected by one ioctl while paused
/// (each costs a few microseconds, mostly KVM's invalidation); gap pages are never copied.
const MAX_GAP: u64 = 16;
/// The same for recorded pages: every page between two written ones is protected already, so
/// a longer span only costs its walk (measured: 12 ioctls took ~0.4 ms at 4 GiB, 2-3 took
/// ~0.15-0.25 ms).
const RECORDED_GAP: u64 = 512;
/// Layers stacked over the base before a capture takes every anonymous page again.
pub(crate) const MAX_LAYERS: usize = 32;

fn err(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::Memory(format!("copy-on-write capture: {what}: {e}"))
}

/// Appends the run `[s, e)` (after every span of `spans`) to `spans`, merged into the last span
/// if at most `gap` pages separate them.
fn extend_spans(spans: &mut Vec<(Gfn, Gfn)>, (s, e): (Gfn, Gfn), gap: u64) {
    match spans.last_mut() {
        Some(last) if s - last.1 <= gap => last.1 = e,
        _ => spans.push((s, e)),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the tracker and its handler thread share.
struct Shared {
    uffd: Uffd,
    /// Host address of the view.
    base: u64,
    /// Pages of the view.
    pages: u64,
    /// The newest layer (published before its pages are protected).
    current: Mutex<Option<Arc<CowLayer>>>,
    /// Pages released by a fault since the last capture (recording trackers: the parent's
    /// writes since, see [`CowTracker::new_recording`]), in fault order. Its lock is held by
    /// a capture from taking them until its pages are protected, and by a fault around
    /// recording and releasing its page: a page is released either wholly before a capture
    /// (and captured by it) or wholly after (and captured by the next).
    written: Mutex<Vec<Gfn>>,
    stop: AtomicBool,
    wake: EventFd,
}

impl Shared {
    /// A write fault on a protected page: its chunk of the newest layer copied first, then
    /// its block recorded and released.
    fn fault(&self, address: u64) {
        let gfn = (address - self.base) / PAGE_SIZE as u64;
        let layer = lock(&self.current).clone();
        if let Some(l) = layer {
            l.complete(gfn / CHUNK);
        }
        // The block around the page, inside the chunk just copied (and inside the view).
        let first = gfn & !(LIFT - 1);
        let end = (first + LIFT).min(self.pages).max(gfn + 1);
        let mut written = lock(&self.written);
        written.extend(first..end);
        let at = self.base + first * PAGE_SIZE as u64;
        if let Err(e) = self
            .uffd
            .writeprotect(at, (end - first) * PAGE_SIZE as u64, false, false)
        {
            tracing::warn!("copy-on-write: lifting the protection of {at:#x}: {e}");
        }
    }

    /// The handler thread: faults first, then the next chunk of the newest layer.
    fn serve(&self) {
        let mut events = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let copying = lock(&self.current)
                .as_ref()
                .is_some_and(|l| !l.is_complete());
            match self.uffd.wait(&self.wake, if copying { 0 } else { -1 }) {
                Ok(r) if r.other => {
                    let _ = self.wake.read();
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("copy-on-write: waiting for faults: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            events.clear();
            if let Err(e) = self.uffd.read_events(&mut events, 32) {
                tracing::warn!("copy-on-write: reading write faults: {e}");
            }
            // Each fault looks the newest layer up after it was read: a capture publishes
            // its layer before protecting any page of it.
            for ev in &events {
                if let Event::Pagefault { address, .. } = *ev {
                    self.fault(address);
                }
            }
            let layer = lock(&self.current).clone();
            if let Some(l) = layer {
                l.copy_next();
            }
        }
    }
}

/// Write-protect tracking of a parent's private RAM view (one per parent, after its first
/// freeze), and the chain of layers of its latest generation.
pub(crate) struct CowTracker {
    shared: Arc<Shared>,
    ram: Arc<GuestRam>,
    handler: Option<JoinHandle<()>>,
    /// The latest generation's image (base and layers), `None` before the first capture.
    chain: Option<LayeredImage>,
    /// The memfd of `chain`'s layers (each at its own offset: one descriptor for all) and
    /// the slot of the next layer in it.
    stack: Option<(Arc<File>, u64)>,
    /// Layers over the base in `chain`.
    depth: usize,
    /// Pages of `chain`'s full layer, and of the layers stacked on it since.
    full_pages: u64,
    stacked_pages: u64,
    /// Layers over the base before a full capture ([`MAX_LAYERS`]; 1: every capture is full).
    max_layers: usize,
    /// Every page of the view was protected before the parent ran on it: every write since
    /// went through the handler, which recorded it (no scan needed).
    recording: bool,
    /// Recording trackers: every page written since the first freeze.
    ever: Bitmap,
}

impl CowTracker {
    /// Registers the private view `ram` for write-protect faults.
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, VmError> {
        if !ram.is_private() {
            return Err(err("registering", "guest RAM is not a private view"));
        }
        let uffd = Uffd::new(features::PAGEFAULT_FLAG_WP | features::WP_HUGETLBFS_SHMEM)
            .map_err(|e| err("userfaultfd", e))?;
        let mode = RegisterMode {
            wp: true,
            ..Default::default()
        };
        uffd.register(ram.host_addr() as u64, ram.size(), mode)
            .map_err(|e| err("registering the view for write-protect faults", e))?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| err("eventfd", e))?;
        let pages = ram.size() / PAGE_SIZE as u64;
        Ok(Self {
            shared: Arc::new(Shared {
                uffd,
                base: ram.host_addr() as u64,
                pages,
                current: Mutex::new(None),
                written: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
                wake,
            }),
            ram,
            handler: None,
            chain: None,
            stack: None,
            depth: 0,
            full_pages: 0,
            stacked_pages: 0,
            max_layers: MAX_LAYERS,
            recording: false,
            ever: Bitmap::new(pages),
        })
    }

    /// [`CowTracker::new`] for a view the VM does not run on yet, with every page of it
    /// write-protected now (before the VM moves onto it: the standby VM of a first freeze).
    /// From then on every write of the VM goes through the handler thread, which records it,
    /// so a capture needs no scan of the page tables: it takes the recorded pages. Where
    /// protecting the whole view fails, the tracker finds written pages by scanning instead.
    pub fn new_recording(ram: Arc<GuestRam>) -> Result<Self, VmError> {
        let mut me = Self::new(ram)?;
        match me
            .shared
            .uffd
            .writeprotect(me.shared.base, me.ram.size(), true, false)
        {
            Ok(()) => me.recording = true,
            Err(e) => {
                tracing::debug!("write-protecting the whole view: {e}; later freezes scan");
                let _ = me
                    .shared
                    .uffd
                    .writeprotect(me.shared.base, me.ram.size(), false, false);
            }
        }
        Ok(me)
    }

    /// [`CowTracker::new`] (or [`CowTracker::new_recording`] if `recording`), or `None`
    /// (logged) where the kernel refuses write-protection on the view: later freezes of that
    /// VM then copy its dirty pages while paused.
    pub fn try_new(ram: Arc<GuestRam>, name: &str, recording: bool) -> Option<Self> {
        let made = if recording {
            Self::new_recording(ram)
        } else {
            Self::new(ram)
        };
        made.map_err(|e| tracing::debug!("{name}: later freezes will copy while paused: {e}"))
            .ok()
    }

    /// Starts the handler thread (call before the VM runs on the view: with a recording
    /// tracker, its first write to any page waits for the handler).
    pub fn activate(&mut self) {
        self.start_handler();
    }

    /// Every capture takes all of the view's anonymous pages (`false`: the method before
    /// incremental layers, kept as a baseline for benchmarks) or only those written since the
    /// previous capture (`true`, the default).
    pub fn set_incremental(&mut self, on: bool) {
        self.max_layers = if on { MAX_LAYERS } else { 1 };
    }

    /// Completes the newest layer's copy in the calling thread (call before pausing the VM
    /// for the next capture: one layer is copied at a time).
    pub fn settle(&mut self) {
        let layer = lock(&self.shared.current).clone();
        if let Some(l) = layer.filter(|l| !l.is_complete()) {
            for c in 0..l.present.words() {
                l.complete(c);
            }
        }
    }

    /// With the VM paused: finds the pages to capture and write-protects them. Returns the
    /// layer (finish with [`CowTracker::launch`] after the resume, whatever happens between).
    pub fn capture(&mut self, name: &str) -> Result<Arc<CowLayer>, VmError> {
        self.settle();
        // A full layer also once the stacked layers hold more pages than the full one: the
        // chain (which the parent keeps) then holds at most twice its written pages.
        let full = self.chain.is_none()
            || self.depth >= self.max_layers
            || self.stacked_pages > self.full_pages;
        let shared = self.shared.clone();
        let base = shared.base;
        let pages = self.ram.size() / PAGE_SIZE as u64;
        let mut written = lock(&shared.written);
        // `present`: the pages the layer holds; `protect`: spans to protect now (runs closer
        // than MAX_GAP pages merged: few ioctls while paused).
        let recorded = self.recording && self.max_layers > 1;
        let (present, protect, taken) = if recorded {
            // Recorded: the pages released since the last capture, nothing scanned. Pages of
            // earlier layers not written since are still protected.
            let mut d = std::mem::take(&mut *written);
            d.sort_unstable();
            d.dedup();
            d.retain(|&g| g < pages);
            let mut protect: Vec<(Gfn, Gfn)> = Vec::new();
            for &g in &d {
                self.ever.set(g);
                extend_spans(&mut protect, (g, g + 1), RECORDED_GAP);
            }
            let present = if full {
                self.ever.clone()
            } else {
                let mut b = Bitmap::new(pages);
                d.iter().for_each(|&g| b.set(g));
                b
            };
            (present, protect, Some(d))
        } else {
            let end = base + self.ram.size();
            let found = if full {
                crate::pagemap::anon_ranges(base, end)
            } else {
                crate::pagemap::written_anon_ranges(base, end)
            }
            .map_err(|e| err("scanning the view", e))?;
            let mut present = Bitmap::new(pages);
            let mut protect: Vec<(Gfn, Gfn)> = Vec::new();
            for (s, e) in found {
                let (s, e) = ((s - base) / PAGE_SIZE as u64, (e - base) / PAGE_SIZE as u64);
                present.set_range(s, e);
                extend_spans(&mut protect, (s, e), MAX_GAP);
            }
            if self.recording {
                // A full scan took everything written: the record starts over.
                written.clear();
                self.ever = present.clone();
            }
            (present, protect, None)
        };
        let (file, slot) = match &self.stack {
            Some((f, slot)) if !full => (f.clone(), *slot),
            _ => {
                let f = memfd_create(c"kscope-cow", self.ram.size())
                    .map_err(|e| err("memfd_create", e))?;
                (Arc::new(File::from(f)), 0)
            }
        };
        let chunks = present.words();
        let busy = (0..chunks).filter(|&c| present.word(c) != 0).count();
        let layer = Arc::new(CowLayer {
            name: name.to_string(),
            pages,
            full,
            recorded,
            offset: slot * self.ram.size(),
            slot,
            chunk_done: AtomicBitmap::new(chunks),
            remaining: AtomicUsize::new(busy),
            cursor: AtomicUsize::new(0),
            failed: Mutex::new(None),
            src: Mutex::new((busy > 0).then(|| self.ram.clone())),
            present: Arc::new(present),
            file,
        });
        // Published before any of its pages is protected: a fault on one of them (from a
        // device thread while the vCPUs are paused) then copies before it releases.
        let previous = lock(&shared.current).replace(layer.clone());
        let p = PAGE_SIZE as u64;
        for (i, &(s, e)) in protect.iter().enumerate() {
            if let Err(e) = shared
                .uffd
                .writeprotect(base + s * p, (e - s) * p, true, false)
            {
                // Undo, so the parent cannot hang on it; the undone pages count as written
                // and are captured again next time.
                for &(s, e) in &protect[..i] {
                    let _ = shared
                        .uffd
                        .writeprotect(base + s * p, (e - s) * p, false, false);
                }
                if let Some(d) = taken {
                    written.extend(d);
                }
                *lock(&shared.current) = previous;
                return Err(err("write-protecting", e));
            }
        }
        Ok(layer)
    }

    /// After the resume: stacks `layer` onto the chain, wakes (or starts) the handler thread
    /// that copies it, and returns the generation's image.
    pub fn launch(
        &mut self,
        layer: Arc<CowLayer>,
        base: &Arc<DeferredImage>,
    ) -> Result<Arc<LayeredImage>, VmError> {
        let mut chain = match (&self.chain, layer.full) {
            (Some(c), false) => c.clone(),
            _ => LayeredImage::new(base.clone()),
        };
        let pushed = chain.push(layer.clone(), layer.present.clone());
        let n = layer.present.count();
        if layer.full {
            (self.depth, self.full_pages, self.stacked_pages) = (1, n, 0);
        } else {
            self.depth += 1;
            self.stacked_pages += n;
        }
        self.chain = pushed.is_ok().then(|| chain.clone());
        self.stack = Some((layer.file.clone(), layer.slot + 1));
        self.start_handler();
        // Cannot fail (sizes match); if it did, the next capture starts a new chain.
        pushed.map_err(|e| err("stacking the layer", e))?;
        Ok(Arc::new(chain))
    }

    /// After a freeze that copied while paused: that image is the chain from now on (it holds
    /// every page the parent wrote; pages still protected are in it unchanged).
    pub fn adopt(&mut self, image: LayeredImage, pages: u64) {
        (self.depth, self.full_pages, self.stacked_pages) = (1, pages, 0);
        self.stack = None;
        self.chain = Some(image);
    }

    fn start_handler(&mut self) {
        if self.handler.is_some() {
            if let Err(e) = self.shared.wake.write(1) {
                tracing::warn!("copy-on-write: waking the handler: {e}");
            }
            return;
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("kscope-cow".into())
            .spawn(move || shared.serve())
        {
            Ok(h) => self.handler = Some(h),
            Err(e) => {
                // Never leave pages protected without a handler: copy here, now, release
                // every page, and start over with a full capture next time.
                tracing::warn!("no copy-on-write handler thread ({e}); copying inline");
                self.settle();
                let _ =
                    self.shared
                        .uffd
                        .writeprotect(self.shared.base, self.ram.size(), false, false);
                self.depth = self.max_layers;
                self.recording = false;
            }
        }
    }
}

impl Drop for CowTracker {
    fn drop(&mut self) {
        // Layers outlive the parent in its children's images: finish the copy while the
        // view is still there (the parent is not running any more).
        self.settle();
        if let Some(h) = self.handler.take() {
            self.shared.stop.store(true, Ordering::Release);
            let _ = self.shared.wake.write(1);
            let _ = h.join();
        }
    }
}

/// A generation layer captured copy-on-write: the pages the parent wrote since its previous
/// capture (or all its pages, for a full layer), copied into a memfd after it resumed (see
/// the module docs).
pub struct CowLayer {
    name: String,
    pages: u64,
    /// Holds every anonymous page of the view at the freeze (stacked on the base alone).
    full: bool,
    /// Its pages came from the handler's record of the parent's writes (no scan).
    recorded: bool,
    /// Where its pages are in `file` (page `g` at `offset + g * PAGE_SIZE`): the layers of one
    /// stack share a memfd, one RAM size apart.
    offset: u64,
    slot: u64,
    present: Arc<Bitmap>,
    /// Chunks of [`CHUNK`] pages copied (or without a page of the layer).
    chunk_done: AtomicBitmap,
    remaining: AtomicUsize,
    /// Where the handler's in-order copy goes on.
    cursor: AtomicUsize,
    failed: Mutex<Option<String>>,
    /// The parent's view until every range is copied; its lock serializes the copies.
    src: Mutex<Option<Arc<GuestRam>>>,
    file: Arc<File>,
}

impl std::fmt::Debug for CowLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowLayer")
            .field("pages", &self.present.count())
            .field("full", &self.full)
            .field("chunks", &self.present.words())
            .field("remaining", &self.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl CowLayer {
    /// The pages the layer holds.
    pub fn present(&self) -> &Bitmap {
        &self.present
    }

    /// True if it holds all the parent's written pages, not only those since the previous
    /// capture.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// True if its pages came from the handler's record of the parent's writes, not from a
    /// scan of the page tables.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }

    fn is_complete(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Copies the next chunk in order that nobody has copied yet.
    fn copy_next(&self) {
        let chunks = self.present.words();
        let mut c = self.cursor.load(Ordering::Relaxed) as u64;
        while c < chunks && (self.present.word(c) == 0 || self.chunk_done.get(c)) {
            c += 1;
        }
        if c < chunks {
            self.complete(c);
        }
        self.cursor.store(c as usize + 1, Ordering::Relaxed);
    }

    /// Copies chunk `c` (pages `c * CHUNK ..`) if nobody has. Its pages stay protected.
    fn complete(&self, c: u64) {
        let word = self.present.word(c);
        if word == 0 || self.chunk_done.get(c) {
            return;
        }
        let mut src = lock(&self.src);
        if self.chunk_done.get(c) {
            return;
        }
        let copied = match src.as_ref() {
            Some(ram) => self.copy_chunk(ram, c, word),
            None => Err("the parent's view was released early".to_string()),
        };
        if let Err(why) = copied {
            lock(&self.failed).get_or_insert(format!(
                "copy-on-write layer of {}: pages {:#x}..{:#x}: {why}",
                self.name,
                c * CHUNK,
                (c + 1) * CHUNK
            ));
        }
        self.chunk_done.set(c);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            *src = None;
        }
    }

    /// Copies the pages of chunk `c` set in `word` from the (still protected) view into the
    /// memfd, one write per run.
    fn copy_chunk(&self, ram: &GuestRam, c: u64, word: u64) -> Result<(), String> {
        let mut rest = word;
        while rest != 0 {
            let first = rest.trailing_zeros() as u64;
            let n = (rest >> first).trailing_ones() as u64;
            rest &= !(((1u128 << n) - 1) << first) as u64;
            let off = (c * CHUNK + first) as usize * PAGE_SIZE;
            // SAFETY: `[off, off + n pages)` lies inside `ram`'s live mapping (the chunk's
            // pages are pages of the view, and `ram` is kept alive by `src`); they are
            // write-protected, so nothing modifies them while they are read.
            let data = unsafe {
                std::slice::from_raw_parts(ram.host_addr().add(off), n as usize * PAGE_SIZE)
            };
            self.file
                .write_all_at(data, self.offset + off as u64)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl PageSource for CowLayer {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> crate::lazy::Result<()> {
        if gfn >= self.pages {
            return Err(LazyError::OutOfRange {
                gfn,
                pages: self.pages,
                what: "copy-on-write layer",
            });
        }
        if self.present.get(gfn) {
            self.complete(gfn / CHUNK);
            if let Some(why) = lock(&self.failed).as_ref() {
                return Err(LazyError::Io {
                    op: why.clone(),
                    source: std::io::Error::other("the page could not be captured"),
                });
            }
        }
        self.file
            .read_exact_at(buf, self.offset + gfn * PAGE_SIZE as u64)
            .map_err(|source| LazyError::Io {
                op: format!("reading the copy-on-write layer of {}", self.name),
                source,
            })
    }
}
