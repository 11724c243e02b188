//! Copy-on-write capture of a parent's later generations: nothing is copied while the parent
//! is paused.
//!
//! After its first freeze a parent runs on a private view of its frozen memfd, so the pages it
//! wrote since are exactly the view's anonymous pages. A later freeze used to copy them while
//! the parent was paused (135 ms for 13,000 pages). Now the pause only
//!
//! 1. finds them with `PAGEMAP_SCAN` ([`crate::pagemap`], time in the populated page tables),
//! 2. write-protects them through a userfaultfd registered in WP mode on the view
//!    ([`CowTracker`], registered once, after the first freeze),
//!
//! and the parent resumes. A copier thread then copies the protected pages into the new
//! layer's memfd, range by range, and lifts the protection of each range once it is copied.
//! A parent write to a page still protected blocks in the kernel and arrives at the copier
//! as a write-protect fault: the copier copies that page's range first, then lifts its
//! protection, which wakes the writer. A child (or anything else) that reads a page of the
//! layer before the copier reached it copies the range itself, under the same lock, so every
//! reader sees the page as it was at the freeze.
//!
//! A range's protection is lifted even when its copy fails (out of memory for the memfd):
//! the parent never hangs, and readers of that range get the error, which fails their VM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::VmError;
use crate::hostmem::{memfd_create, Gfn, PAGE_SIZE};
use crate::lazy::{AtomicBitmap, Bitmap, LazyError, PageSource};
use crate::memory::GuestRam;
use crate::uffd::{features, Event, RegisterMode, Uffd};

/// Pages per protected range at most: a parent write waits for at most this many page copies.
const MAX_RANGE: u64 = 64;
/// Anonymous runs separated by at most this many pages are protected by one ioctl while
/// paused (each costs a few microseconds, mostly KVM's invalidation); gap pages are never
/// copied and lose their protection with the range that covers them.
const MAX_GAP: u64 = 16;

fn err(what: &str, e: impl std::fmt::Display) -> VmError {
    VmError::Memory(format!("copy-on-write capture: {what}: {e}"))
}

/// Write-protect tracking of a parent's private RAM view (one per parent, after its first
/// freeze).
pub(crate) struct CowTracker {
    uffd: Arc<Uffd>,
    ram: Arc<GuestRam>,
    copier: Option<JoinHandle<()>>,
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
        Ok(Self {
            uffd: Arc::new(uffd),
            ram,
            copier: None,
        })
    }

    /// [`CowTracker::new`], or `None` (logged) where the kernel refuses write-protection on
    /// the view: later freezes of that VM then copy its dirty pages while paused.
    pub fn try_new(ram: Arc<GuestRam>, name: &str) -> Option<Self> {
        Self::new(ram)
            .map_err(|e| tracing::debug!("{name}: later freezes will copy while paused: {e}"))
            .ok()
    }

    /// Waits until the previous capture's layer is complete (call before pausing the VM for
    /// the next capture: one layer is copied at a time).
    pub fn settle(&mut self) {
        if let Some(h) = self.copier.take() {
            let _ = h.join();
        }
    }

    /// With the VM paused: finds the view's anonymous pages and write-protects them. Returns
    /// the layer (complete it with [`CowTracker::launch`] after the resume).
    pub fn capture(&mut self, name: &str) -> Result<Arc<CowLayer>, VmError> {
        self.settle();
        let base = self.ram.host_addr() as u64;
        let pages = self.ram.size() / PAGE_SIZE as u64;
        let anon = crate::pagemap::anon_ranges(base, base + self.ram.size())
            .map_err(|e| err("scanning the view", e))?;
        let mut present = Bitmap::new(pages);
        // Spans to protect: anonymous runs closer than MAX_GAP pages merged (few ioctls
        // while paused).
        let mut spans: Vec<(Gfn, Gfn)> = Vec::new();
        for (s, e) in anon {
            let (s, e) = ((s - base) / PAGE_SIZE as u64, (e - base) / PAGE_SIZE as u64);
            present.set_range(s, e);
            match spans.last_mut() {
                Some(last) if s - last.1 <= MAX_GAP => last.1 = e,
                _ => spans.push((s, e)),
            }
        }
        let p = PAGE_SIZE as u64;
        for (i, &(s, e)) in spans.iter().enumerate() {
            if let Err(e) = self
                .uffd
                .writeprotect(base + s * p, (e - s) * p, true, false)
            {
                // Undo what was protected so the parent cannot hang on it.
                for &(s, e) in &spans[..i] {
                    let _ = self
                        .uffd
                        .writeprotect(base + s * p, (e - s) * p, false, false);
                }
                return Err(err("write-protecting", e));
            }
        }
        // Copy ranges: the spans cut into pieces of at most MAX_RANGE pages; together they
        // cover every protected page, so lifting each range's protection lifts all of it.
        let ranges: Vec<(Gfn, Gfn)> = spans
            .iter()
            .flat_map(|&(s, e)| {
                (s..e)
                    .step_by(MAX_RANGE as usize)
                    .map(move |a| (a, e.min(a + MAX_RANGE)))
            })
            .collect();
        let file = File::from(
            memfd_create(c"kscope-cow", self.ram.size()).map_err(|e| err("memfd_create", e))?,
        );
        let layer = Arc::new(CowLayer {
            name: name.to_string(),
            pages,
            base,
            range_done: AtomicBitmap::new(ranges.len() as u64),
            remaining: AtomicUsize::new(ranges.len()),
            failed: Mutex::new(None),
            src: Mutex::new((!ranges.is_empty()).then(|| self.ram.clone())),
            uffd: self.uffd.clone(),
            present,
            ranges,
            file,
        });
        Ok(layer)
    }

    /// After the resume: starts the thread that copies `layer` and serves the parent's
    /// write-protect faults until the layer is complete.
    pub fn launch(&mut self, layer: Arc<CowLayer>) {
        let l = layer.clone();
        match std::thread::Builder::new()
            .name("kscope-cow".into())
            .spawn(move || l.copy_all())
        {
            Ok(h) => self.copier = Some(h),
            Err(e) => {
                // Never leave pages protected without a copier: copy here, now.
                tracing::warn!("no copier thread ({e}); copying the layer inline");
                layer.copy_all();
            }
        }
    }
}

/// A generation layer captured copy-on-write: the pages the parent had written at the
/// freeze, copied into a memfd after the parent resumed (see the module docs).
pub struct CowLayer {
    name: String,
    pages: u64,
    /// Host address of the parent's view.
    base: u64,
    present: Bitmap,
    /// Protected ranges of pages, sorted, disjoint.
    ranges: Vec<(Gfn, Gfn)>,
    range_done: AtomicBitmap,
    remaining: AtomicUsize,
    failed: Mutex<Option<String>>,
    /// The parent's view until every range is copied; its lock serializes the copies.
    src: Mutex<Option<Arc<GuestRam>>>,
    uffd: Arc<Uffd>,
    file: File,
}

impl std::fmt::Debug for CowLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowLayer")
            .field("pages", &self.present.count())
            .field("ranges", &self.ranges.len())
            .field("remaining", &self.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl CowLayer {
    /// The pages the layer holds (written by the parent before the freeze).
    pub fn present(&self) -> &Bitmap {
        &self.present
    }

    fn range_of(&self, gfn: Gfn) -> Option<usize> {
        let i = self.ranges.partition_point(|&(_, e)| e <= gfn);
        (i < self.ranges.len() && self.ranges[i].0 <= gfn).then_some(i)
    }

    /// Copies range `r` if nobody has, then lifts its protection (waking blocked writers).
    fn complete(&self, r: usize) {
        if self.range_done.get(r as u64) {
            return;
        }
        let mut src = self.src.lock().unwrap_or_else(|p| p.into_inner());
        if self.range_done.get(r as u64) {
            return;
        }
        let (s, e) = self.ranges[r];
        let copied = match src.as_ref() {
            Some(ram) => self.copy_range(ram, s, e),
            None => Err("the parent's view was released early".to_string()),
        };
        if let Err(why) = copied {
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert(format!(
                "copy-on-write layer of {}: pages {s:#x}..{e:#x}: {why}",
                self.name
            ));
        }
        self.range_done.set(r as u64);
        let p = PAGE_SIZE as u64;
        if let Err(e) = self
            .uffd
            .writeprotect(self.base + s * p, (e - s) * p, false, false)
        {
            tracing::warn!("{}: lifting write protection: {e}", self.name);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            *src = None;
        }
    }

    /// Copies the present pages of `[s, e)` from the (still protected) view into the memfd.
    fn copy_range(&self, ram: &GuestRam, s: Gfn, e: Gfn) -> Result<(), String> {
        let mut g = s;
        while g < e {
            if !self.present.get(g) {
                g += 1;
                continue;
            }
            let mut n = 1;
            while g + n < e && self.present.get(g + n) {
                n += 1;
            }
            let off = g as usize * PAGE_SIZE;
            // SAFETY: `[off, off + n pages)` lies inside `ram`'s live mapping (ranges come from
            // a scan of it, and `ram` is kept alive by `src`); the pages are write-protected,
            // so nothing modifies them while they are read.
            let data = unsafe {
                std::slice::from_raw_parts(ram.host_addr().add(off), n as usize * PAGE_SIZE)
            };
            self.file
                .write_all_at(data, off as u64)
                .map_err(|e| e.to_string())?;
            g += n;
        }
        Ok(())
    }

    /// The copier: serve write-protect faults first, then copy the next range.
    fn copy_all(&self) {
        let mut events = Vec::new();
        let mut next = 0;
        while self.remaining.load(Ordering::Acquire) > 0 {
            events.clear();
            if let Err(e) = self.uffd.read_events(&mut events, 32) {
                tracing::warn!("{}: reading write-protect faults: {e}", self.name);
            }
            for ev in &events {
                if let Event::Pagefault { address, .. } = *ev {
                    let gfn = (address.saturating_sub(self.base)) / PAGE_SIZE as u64;
                    match self.range_of(gfn) {
                        Some(r) => self.complete(r),
                        // Not ours (cannot happen): never leave a writer blocked.
                        None => {
                            let a = address & !(PAGE_SIZE as u64 - 1);
                            let _ = self.uffd.writeprotect(a, PAGE_SIZE as u64, false, false);
                        }
                    }
                }
            }
            if next < self.ranges.len() {
                self.complete(next);
                next += 1;
            }
        }
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
        if let Some(r) = self.range_of(gfn) {
            self.complete(r);
            if let Some(why) = self
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                return Err(LazyError::Io {
                    op: why.clone(),
                    source: std::io::Error::other("the page could not be captured"),
                });
            }
        }
        self.file
            .read_exact_at(buf, gfn * PAGE_SIZE as u64)
            .map_err(|source| LazyError::Io {
                op: format!("reading the copy-on-write layer of {}", self.name),
                source,
            })
    }
}
