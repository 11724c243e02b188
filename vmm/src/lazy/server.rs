//! The fault server: one handler thread per clone serving its userfaultfd, plus an optional
//! background fetcher thread, both driven by the clone's prefetch policy.
//!
//! Install order on a fault: the faulting page first (then the faulter is woken), then the
//! policy's prefetch list. The policy is asked once per fault ([`Prefetcher::on_fault`] returns
//! the whole [`FaultPlan`]: how to install the faulting frame and what to prefetch, each as data
//! or zeros) and is owned by the handler thread, so no lock sits on the fault path; its
//! pre-resume and background lists are taken when the server starts. Prefetch work is queued and done in small chunks between reads of
//! the event queue, so a new fault never waits behind a long prefetch list. Every installer
//! (handler, pre-resume caller, background fetcher) may race with the others: a page found
//! present (`EEXIST`) counts as done, and the faulting page is woken explicitly in that case.
//!
//! A page the source cannot give (a read error, or a page that fails its checksum, see
//! [`VerifiedImage`](super::VerifiedImage)) is never replaced by zeros: a prefetch skips it,
//! and a vCPU fault on it fails the VM through the failure hook ([`FaultServer::on_failure`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::stats::CloneStats;
use super::{
    AtomicBitmap, Bitmap, LayeredImage, LazyError, LazyRegion, MemfdImage, PageSource, Result,
    StatsSnapshot, PAGE_SIZE,
};
use crate::prefetch::{Fault, FaultPlan, Fill, Gfn, Install, Prefetcher};
use crate::uffd::{self, Event};
use crate::worker::{Parked, Worker};

/// Largest run of contiguous pages installed by one `UFFDIO_COPY`.
const MAX_RUN: usize = 64;
/// Prefetch pages installed between two looks at the fault queue.
const PREFETCH_CHUNK: usize = 16;

/// Tuning of a [`FaultServer`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Name used for threads and logs (e.g. the clone id).
    pub name: String,
    /// Install contiguous prefetch/background runs with one ioctl (up to 64 pages).
    pub batch_runs: bool,
    /// After the fault queue runs dry, keep polling it this long before sleeping (trades a
    /// busy CPU for lower fault latency during a clone's warm-up). Zero: sleep at once.
    pub spin: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            name: "clone".into(),
            batch_runs: true,
            spin: Duration::ZERO,
        }
    }
}

/// Result of installing a list of frames (pre-resume or eager).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InstallReport {
    /// Frames asked for.
    pub requested: u64,
    /// Pages installed with data.
    pub copied: u64,
    /// Pages installed as zero pages.
    pub zeroed: u64,
    /// Frames skipped because already present.
    pub skipped: u64,
    /// Wall time (ns).
    pub elapsed_ns: u64,
}

/// Why a page is being installed (selects the counter).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Fault,
    Prefetch,
    BeforeResume,
    Background,
}

struct Shared {
    region: LazyRegion,
    source: Arc<dyn PageSource>,
    policy: String,
    present: AtomicBitmap,
    faulted: AtomicBitmap,
    discarded: AtomicBitmap,
    fault_order: Mutex<Vec<Gfn>>,
    stats: CloneStats,
    stop: AtomicBool,
    batch_runs: bool,
    name: String,
    failure: Mutex<Failure>,
    /// Set once `failure` holds an error: read on every fault without taking the lock.
    failed: AtomicBool,
}

/// The first fatal source error and the hook that reports it (either may come first).
#[derive(Default)]
struct Failure {
    error: Option<Arc<LazyError>>,
    hook: Option<FailureHook>,
}

/// Called once, from the handler thread, when a vCPU faults on a page the source cannot give.
pub type FailureHook = Box<dyn FnOnce(Arc<LazyError>) + Send>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking policy must not take the server down: the data stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn pages(&self) -> u64 {
        self.region.pages()
    }

    /// True if the page must be installed as zeros rather than read.
    fn is_zero(&self, gfn: Gfn, fill: Fill) -> bool {
        fill == Fill::Zero
            || self.discarded.get(gfn)
            || gfn >= self.source.pages()
            || self.source.is_known_zero(gfn)
    }

    fn count(&self, why: Why, pages: u64) {
        let c = match why {
            Why::Fault => &self.stats.fault_pages,
            Why::Prefetch => &self.stats.prefetched,
            Why::BeforeResume => &self.stats.before_resume,
            Why::Background => &self.stats.background,
        };
        CloneStats::add(c, pages);
    }

    /// True once a vCPU faulted on a page the source could not give.
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Records a fatal source error and runs the failure hook (once).
    fn fail(&self, e: LazyError) {
        let mut f = lock(&self.failure);
        if f.error.is_some() {
            return;
        }
        let e = Arc::new(e);
        f.error = Some(e.clone());
        self.failed.store(true, Ordering::Release);
        let hook = f.hook.take();
        drop(f);
        match hook {
            Some(h) => h(e),
            None => {
                tracing::error!(clone = %self.name, error = %e, "fatal source error before the failure hook was set")
            }
        }
    }

    /// Installs one page; returns true if this call installed it. Wakes waiters. For a fault
    /// the page is installed even if marked present (it evidently is not mapped).
    ///
    /// A page the source cannot give is not installed, except for a fault: then the VM is
    /// failed first (its vCPUs are stopped and kicked, so the guest does not run again) and
    /// the faulting page is released as zeros so that the blocked vCPU thread can exit.
    fn install_one(&self, gfn: Gfn, zero: bool, why: Why, buf: &mut [u8; PAGE_SIZE]) -> bool {
        let addr = self.region.gfn_addr(gfn);
        let uffd = self.region.uffd();
        let mut zero = zero;
        if !zero {
            if let Err(e) = self.source.read_page(gfn, buf) {
                CloneStats::add(&self.stats.source_errors, 1);
                if why != Why::Fault {
                    tracing::warn!(clone = %self.name, gfn, error = %e, "source read failed; page not installed");
                    return false;
                }
                tracing::error!(clone = %self.name, gfn, error = %e, "source read failed on a fault; failing the VM");
                self.fail(e);
                zero = true;
            } else if why == Why::Fault && self.failed() {
                zero = true;
            }
        }
        let r = if zero {
            uffd.zeropage(addr, PAGE_SIZE as u64, false)
        } else {
            uffd.copy(addr, &buf[..], false, false)
        };
        match r {
            Ok(uffd::Install::Installed) => {
                self.present.set(gfn);
                self.discarded.clear(gfn);
                if zero {
                    CloneStats::add(&self.stats.zero_filled, 1);
                } else {
                    CloneStats::add(&self.stats.bytes_copied, PAGE_SIZE as u64);
                    self.count(why, 1);
                }
                true
            }
            Ok(uffd::Install::AlreadyPresent(_)) => {
                self.present.set(gfn);
                CloneStats::add(&self.stats.already_present, 1);
                if why == Why::Fault {
                    // The kernel does not wake on EEXIST; the faulter may be waiting.
                    if let Err(e) = uffd.wake(addr, PAGE_SIZE as u64) {
                        tracing::error!(clone = %self.name, gfn, error = %e, "wake failed");
                    }
                }
                false
            }
            Err(e) => {
                CloneStats::add(&self.stats.install_errors, 1);
                tracing::error!(clone = %self.name, gfn, error = %e, "install failed");
                if why == Why::Fault {
                    // The faulting vCPU cannot go on without this page (e.g. ENOMEM: the host
                    // ran out of memory). Fail the VM, then try to release the vCPU with a
                    // zero page so that it can stop (the guest does not run again).
                    self.fail(LazyError::Uffd(e));
                    if !zero {
                        let _ = uffd.zeropage(addr, PAGE_SIZE as u64, false);
                    }
                }
                false
            }
        }
    }

    /// Installs a contiguous run of data pages `[start, start + n)` with one copy; pages found
    /// present are skipped. Returns pages installed by this call.
    fn install_run(&self, start: Gfn, n: usize, why: Why, run_buf: &mut Vec<u8>) -> u64 {
        run_buf.resize(n * PAGE_SIZE, 0);
        if let Err(e) = self.source.read_run(start, run_buf) {
            tracing::warn!(clone = %self.name, start, n, error = %e, "source run read failed; page by page");
            let mut page = [0u8; PAGE_SIZE];
            return (start..start + n as u64)
                .map(|g| u64::from(self.install_one(g, false, why, &mut page)))
                .sum();
        }
        let mut off = 0usize;
        let mut installed = 0u64;
        while off < run_buf.len() {
            let addr = self.region.gfn_addr(start) + off as u64;
            match self.region.uffd().copy(addr, &run_buf[off..], false, false) {
                Ok(uffd::Install::Installed) => {
                    installed += ((run_buf.len() - off) / PAGE_SIZE) as u64;
                    break;
                }
                Ok(uffd::Install::AlreadyPresent(done)) => {
                    installed += done / PAGE_SIZE as u64;
                    CloneStats::add(&self.stats.already_present, 1);
                    off += done as usize + PAGE_SIZE;
                }
                Err(e) => {
                    CloneStats::add(&self.stats.install_errors, 1);
                    tracing::error!(clone = %self.name, start, n, error = %e, "run install failed");
                    return installed;
                }
            }
        }
        for g in start..start + n as u64 {
            self.present.set(g);
        }
        CloneStats::add(&self.stats.bytes_copied, installed * PAGE_SIZE as u64);
        self.count(why, installed);
        installed
    }

    /// Installs frames in order, skipping present ones. Contiguous data frames are batched
    /// when enabled.
    fn install_list(&self, list: &[Install], why: Why, rep: &mut InstallReport, sc: &mut Scratch) {
        let (buf, run_buf) = (&mut sc.page, &mut sc.run);
        let mut i = 0;
        while i < list.len() {
            let Install { gfn: g, fill } = list[i];
            if g >= self.pages() || self.present.get(g) {
                rep.skipped += 1;
                i += 1;
                continue;
            }
            if self.is_zero(g, fill) {
                if self.install_one(g, true, why, buf) {
                    rep.zeroed += 1;
                } else {
                    rep.skipped += 1;
                }
                i += 1;
                continue;
            }
            let mut n = 1;
            while self.batch_runs
                && n < MAX_RUN
                && i + n < list.len()
                && list[i + n].gfn == g + n as u64
                && list[i + n].gfn < self.pages()
                && !self.present.get(list[i + n].gfn)
                && !self.is_zero(list[i + n].gfn, list[i + n].fill)
            {
                n += 1;
            }
            let done = if n == 1 {
                u64::from(self.install_one(g, false, why, buf))
            } else {
                self.install_run(g, n, why, run_buf)
            };
            rep.copied += done;
            rep.skipped += n as u64 - done;
            i += n;
        }
    }
}

/// Reusable buffers of one installing thread.
struct Scratch {
    page: Box<[u8; PAGE_SIZE]>,
    run: Vec<u8>,
}

impl Scratch {
    fn new() -> Self {
        Self {
            page: Box::new([0; PAGE_SIZE]),
            run: Vec::with_capacity(MAX_RUN * PAGE_SIZE),
        }
    }
}

/// The handler thread's state.
struct Handler {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    /// The clone's policy: only this thread calls it.
    policy: Box<dyn Prefetcher>,
    /// The plan of the fault being served (reused).
    plan: FaultPlan,
    /// Pending prefetch lists, newest fault's first: (frames, next index).
    queue: VecDeque<(Vec<Install>, usize)>,
    events: Vec<Event>,
    scratch: Scratch,
    spin: Duration,
}

impl Handler {
    fn run(mut self) -> Result<()> {
        let s = Arc::clone(&self.shared);
        let uffd = s.region.uffd();
        loop {
            if s.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.events.clear();
            uffd.read_events(&mut self.events, 32)?;
            if self.events.is_empty() {
                if !self.queue.is_empty() {
                    self.prefetch_chunk();
                    continue;
                }
                if !self.spin.is_zero() {
                    let t0 = Instant::now();
                    while self.events.is_empty()
                        && t0.elapsed() < self.spin
                        && !s.stop.load(Ordering::Relaxed)
                    {
                        // Yield: the faulting vCPU or another clone may want this core.
                        std::thread::yield_now();
                        uffd.read_events(&mut self.events, 32)?;
                    }
                }
                if self.events.is_empty() {
                    if uffd.wait(&self.stop, -1)?.other {
                        return Ok(());
                    }
                    continue;
                }
            }
            let events = std::mem::take(&mut self.events);
            for ev in &events {
                self.handle(*ev);
            }
            self.events = events;
        }
    }

    fn handle(&mut self, ev: Event) {
        let s = Arc::clone(&self.shared);
        match ev {
            Event::Pagefault { address, write, .. } => {
                let t0 = Instant::now();
                let Some(gfn) = s.region.addr_gfn(address) else {
                    tracing::error!(clone = %s.name, address, "fault outside the region");
                    return;
                };
                CloneStats::add(&s.stats.faults, 1);
                self.plan.clear();
                // A panicking policy must not leave the faulter blocked: serve the page anyway.
                let (policy, plan) = (&mut self.policy, &mut self.plan);
                let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    policy.on_fault(Fault { gfn, write }, plan)
                }));
                if asked.is_err() {
                    tracing::error!(clone = %s.name, gfn, "prefetch policy panicked; serving the page alone");
                    self.plan.clear();
                }
                s.install_one(
                    gfn,
                    s.is_zero(gfn, self.plan.fault),
                    Why::Fault,
                    &mut self.scratch.page,
                );
                s.stats.fault_latency.record(t0.elapsed().as_nanos() as u64);
                // Book-keeping after the faulter was woken.
                if s.faulted.set(gfn) {
                    lock(&s.fault_order).push(gfn);
                }
                if !self.plan.prefetch.is_empty() {
                    let list = std::mem::take(&mut self.plan.prefetch);
                    self.queue.push_front((list, 0));
                }
            }
            Event::Remove { start, end } => {
                let first = s.region.addr_gfn(start);
                let last = s.region.addr_gfn(end.saturating_sub(1));
                if let (Some(a), Some(b)) = (first, last) {
                    for g in a..=b {
                        s.present.clear(g);
                        s.discarded.set(g);
                    }
                    CloneStats::add(&s.stats.removed, b - a + 1);
                }
            }
            other => tracing::debug!(clone = %s.name, ?other, "ignored userfaultfd event"),
        }
    }

    fn prefetch_chunk(&mut self) {
        let Some((list, next)) = self.queue.front_mut() else {
            return;
        };
        let end = (*next + PREFETCH_CHUNK).min(list.len());
        let mut rep = InstallReport::default();
        self.shared.install_list(
            &list[*next..end],
            Why::Prefetch,
            &mut rep,
            &mut self.scratch,
        );
        *next = end;
        if end == list.len() {
            self.queue.pop_front();
        }
    }
}

/// Serves one clone's [`LazyRegion`] from a [`PageSource`] under a [`Prefetcher`].
///
/// Threads: one handler (`kscope-uffd-<name>`), plus one background fetcher once
/// [`start_background`](Self::start_background) is called. [`shutdown`](Self::shutdown) (or
/// drop) stops and joins them, then closes the userfaultfd, unmaps and closes the memfd. The
/// VMM must have removed the KVM memory slot (and stopped the vCPUs) before that.
pub struct FaultServer {
    shared: Arc<Shared>,
    /// The policy's pre-resume list, until [`FaultServer::before_resume`] installs it.
    before: Mutex<Vec<Install>>,
    /// The policy's background list, until the fetcher starts.
    background: Vec<Install>,
    stop: Arc<EventFd>,
    handler: Option<Worker<Result<()>>>,
    fetcher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultServer")
            .field("name", &self.shared.name)
            .field("region", &self.shared.region)
            .finish()
    }
}

impl FaultServer {
    /// Starts serving `region` from `source` (which must not be larger than the region).
    pub fn start(
        region: LazyRegion,
        source: Arc<dyn PageSource>,
        prefetcher: Box<dyn Prefetcher>,
        opts: ServerOptions,
    ) -> Result<Self> {
        Self::start_on(region, source, prefetcher, opts, None)
    }

    /// [`FaultServer::start`], with the handler on `thread` when given (a thread started
    /// ahead of time, see [`crate::pool`]).
    pub fn start_on(
        region: LazyRegion,
        source: Arc<dyn PageSource>,
        mut prefetcher: Box<dyn Prefetcher>,
        opts: ServerOptions,
        thread: Option<Parked>,
    ) -> Result<Self> {
        if source.pages() > region.pages() {
            return Err(LazyError::Size(format!(
                "source has {} pages but the region only {}",
                source.pages(),
                region.pages()
            )));
        }
        let pages = region.pages();
        let policy = prefetcher.name().to_string();
        let before = prefetcher.before_resume();
        let background = prefetcher.background();
        let shared = Arc::new(Shared {
            region,
            source,
            policy,
            present: AtomicBitmap::new(pages),
            faulted: AtomicBitmap::new(pages),
            discarded: AtomicBitmap::new(pages),
            fault_order: Mutex::new(Vec::new()),
            stats: CloneStats::default(),
            stop: AtomicBool::new(false),
            batch_runs: opts.batch_runs,
            name: opts.name.clone(),
            failure: Mutex::new(Failure::default()),
            failed: AtomicBool::new(false),
        });
        // One eventfd shared by the server and its handler (no dup: one fd less per clone).
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| LazyError::Io {
            op: "eventfd".into(),
            source: e,
        })?);
        let handler = Handler {
            shared: Arc::clone(&shared),
            stop: Arc::clone(&stop),
            policy: prefetcher,
            plan: FaultPlan::default(),
            queue: VecDeque::new(),
            events: Vec::with_capacity(32),
            scratch: Scratch::new(),
            spin: opts.spin,
        };
        let tname = format!("kscope-uffd-{}", opts.name);
        let handle = Worker::start(&tname, thread, move || handler.run()).map_err(|e| {
            LazyError::Thread {
                name: tname.clone(),
                what: e.to_string(),
            }
        })?;
        Ok(Self {
            shared,
            before: Mutex::new(before),
            background,
            stop,
            handler: Some(handle),
            fetcher: None,
        })
    }

    /// Sets the hook called (once, from the handler thread) when a vCPU faults on a page the
    /// source cannot give: a read error or a page that fails its checksum. The hook must stop
    /// the VM; it runs at once if that already happened.
    pub fn on_failure(&self, hook: FailureHook) {
        let mut f = lock(&self.shared.failure);
        match f.error.clone() {
            Some(e) => {
                drop(f);
                hook(e);
            }
            None => f.hook = Some(hook),
        }
    }

    /// The fatal source error, if a vCPU faulted on a page the source could not give.
    pub fn failure(&self) -> Option<Arc<LazyError>> {
        lock(&self.shared.failure).error.clone()
    }

    /// The served region (its [`host_addr`](LazyRegion::host_addr) goes into the memory slot).
    pub fn region(&self) -> &LazyRegion {
        &self.shared.region
    }

    /// Installs the policy's `before_resume()` frames (once); call before starting the vCPUs.
    pub fn before_resume(&self) -> Result<InstallReport> {
        let list = std::mem::take(&mut *lock(&self.before));
        Ok(self.install_plan(&list))
    }

    /// Installs the given frames now with data (in order, skipping present ones), from the
    /// calling thread. Counted as pre-resume installs.
    pub fn install(&self, gfns: &[Gfn]) -> Result<InstallReport> {
        let list: Vec<Install> = gfns.iter().map(|&g| Install::data(g)).collect();
        Ok(self.install_plan(&list))
    }

    fn install_plan(&self, list: &[Install]) -> InstallReport {
        let t0 = Instant::now();
        let mut rep = InstallReport {
            requested: list.len() as u64,
            ..Default::default()
        };
        self.shared
            .install_list(list, Why::BeforeResume, &mut rep, &mut Scratch::new());
        rep.elapsed_ns = t0.elapsed().as_nanos() as u64;
        rep
    }

    /// Starts the background fetcher on the policy's `background()` frames (no-op if the list
    /// is empty or a fetcher already ran).
    pub fn start_background(&mut self) -> Result<()> {
        if self.fetcher.is_some() {
            return Ok(());
        }
        let list = std::mem::take(&mut self.background);
        if list.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let tname = format!("kscope-fetch-{}", shared.name);
        let h = std::thread::Builder::new()
            .name(tname.clone())
            .spawn(move || {
                let mut rep = InstallReport::default();
                let mut sc = Scratch::new();
                for chunk in list.chunks(MAX_RUN) {
                    if shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                    shared.install_list(chunk, Why::Background, &mut rep, &mut sc);
                }
            })
            .map_err(|e| LazyError::Thread {
                name: tname,
                what: e.to_string(),
            })?;
        self.fetcher = Some(h);
        Ok(())
    }

    /// True once the background fetcher has finished its list (false if never started).
    pub fn background_done(&self) -> bool {
        self.fetcher.as_ref().is_some_and(|h| h.is_finished())
    }

    /// Waits for the background fetcher to finish its list.
    pub fn join_background(&mut self) -> Result<()> {
        if let Some(h) = self.fetcher.take() {
            h.join().map_err(|_| LazyError::Thread {
                name: self.shared.name.clone(),
                what: "fetcher panicked".into(),
            })?;
        }
        Ok(())
    }

    /// Statistics so far.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared;
        let mut snap = s.stats.snapshot();
        snap.policy = s.policy.clone();
        snap.touched_pages = s.faulted.count();
        snap.present_pages = s.present.count();
        snap.resident_bytes = s.region.resident_bytes().unwrap_or(0);
        snap
    }

    /// Distinct faulted frames in first-fault order (a REAP/FaaSnap working-set recording).
    pub fn touched(&self) -> Vec<Gfn> {
        lock(&self.shared.fault_order).clone()
    }

    /// Bitmap of faulted frames.
    pub fn touched_bitmap(&self) -> Bitmap {
        self.shared.faulted.snapshot()
    }

    /// Bitmap of frames present in the destination.
    pub fn present_bitmap(&self) -> Bitmap {
        self.shared.present.snapshot()
    }

    /// The source this clone is served from.
    pub fn source(&self) -> &Arc<dyn PageSource> {
        &self.shared.source
    }

    /// An image of this clone's memory as it is now, to clone the clone: its memfd as the
    /// newest layer (pages installed or discarded, the latter reading as zeros) over its own
    /// source. The memfd is shared, not copied: the clone must stay paused (or be replaced by
    /// a clone of its own) while the image is read. Needs [`RegionKind::SharedMemfd`].
    pub fn freeze(&self) -> Result<LayeredImage> {
        let s = &self.shared;
        let fd = s.region.memfd().ok_or_else(|| {
            LazyError::Size(
                "an anonymous (AnonPrivate) region cannot be frozen; use SharedMemfd".into(),
            )
        })?;
        let fd = fd.try_clone_to_owned().map_err(|e| LazyError::Io {
            op: "dup clone memfd".into(),
            source: e,
        })?;
        let own = MemfdImage::new(fd, s.region.pages())?;
        let mut have = s.present.snapshot();
        s.discarded.snapshot().iter_set().for_each(|g| have.set(g));
        let mut image = LayeredImage::with_pages(Arc::clone(&s.source), s.region.pages())?;
        image.push(Arc::new(own), have)?;
        Ok(image)
    }

    /// Stops the threads and joins them; returns the final statistics. The region is released
    /// when the server is dropped.
    pub fn shutdown(mut self) -> Result<StatsSnapshot> {
        self.stop_threads()?;
        Ok(self.stats())
    }

    fn stop_threads(&mut self) -> Result<()> {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        let mut res = Ok(());
        if let Some(h) = self.fetcher.take() {
            if h.join().is_err() {
                res = Err(LazyError::Thread {
                    name: self.shared.name.clone(),
                    what: "fetcher panicked".into(),
                });
            }
        }
        if let Some(h) = self.handler.take() {
            match h.join() {
                Ok(r) => res = res.and(r),
                Err(_) => {
                    res = Err(LazyError::Thread {
                        name: self.shared.name.clone(),
                        what: "handler panicked".into(),
                    })
                }
            }
        }
        res
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_threads() {
            tracing::error!(clone = %self.shared.name, error = %e, "fault server stopped with an error");
        }
    }
}
