//! Live cloning of a running VM (SnowFlock/Kaleidoscope style), in visible steps:
//!
//! 1. [`Vm::freeze`] freezes the parent's memory as a copy-on-write *generation image*
//!    ([`Generation`], see [`freeze`] for how the pause stays short) with its machine state.
//! 2. The caller may prepare per-generation work, e.g. color the image once for the prefetch
//!    policies (`kscope_policies::color_generation`), and build the policy factory once.
//! 3. [`Generation::spawn`] creates `n` children, each a new VM that resumes exactly where the
//!    parent was: same vCPU state (registers, XSAVE, MSRs, events, clock), same device state
//!    (serial, virtio-mmio transports and queues), same memory.
//!
//! [`Vm::clone_children`] is steps 1 and 3 without a policy step. Memory per [`MemoryMode`]:
//! `Lazy` children start with nothing and fault every page in from the image through
//! userfaultfd (driven by a [`Prefetcher`]); `Eager` children get a full copy first. Each
//! child's GenPage carries a new generation, its clone id, fresh randomness and an identity,
//! written before its first instruction; the guest kernel reacts with SIGCLONE.

pub(crate) mod child;
pub mod cow;
pub mod freeze;
pub(crate) mod rehome;

pub use child::SpawnBreakdown;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::VmError;
use crate::pool::ShellPool;
use crate::prefetch::Prefetcher;
use crate::vm::Vm;

pub use crate::generation::{FreezeReport, Generation};

/// How a VM's memory is filled from its generation image (clones, snapshot restores). The
/// one memory-mode type of the project: the API and the CLI use its serde/`FromStr` names
/// `lazy` and `eager`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Start empty; serve each page on first touch from the generation image (userfaultfd),
    /// plus whatever the prefetch policy asks for. Untouched pages are never allocated.
    #[default]
    Lazy,
    /// Copy every non-zero page before the VM runs (the baseline).
    Eager,
}

impl MemoryMode {
    /// Every mode.
    pub const ALL: [MemoryMode; 2] = [MemoryMode::Lazy, MemoryMode::Eager];

    /// The name used by the API and the CLI.
    pub const fn as_str(self) -> &'static str {
        match self {
            MemoryMode::Lazy => "lazy",
            MemoryMode::Eager => "eager",
        }
    }
}

impl fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown memory-mode name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown memory mode {0:?}: use \"lazy\" or \"eager\"")]
pub struct UnknownMemoryMode(pub String);

impl FromStr for MemoryMode {
    type Err = UnknownMemoryMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MemoryMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownMemoryMode(s.to_string()))
    }
}

/// What a [`PrefetcherFactory`] learns about the clone it makes a policy for.
#[derive(Clone)]
pub struct CloneContext {
    /// The generation image the clone is served from.
    pub generation: Arc<Generation>,
    /// Index of the clone in its batch (0-based).
    pub index: usize,
    /// The clone's id (as written into its GenPage).
    pub clone_id: u64,
}

/// Makes the prefetch policy of one clone.
pub type PrefetcherFactory = Arc<dyn Fn(&CloneContext) -> Box<dyn Prefetcher> + Send + Sync>;

/// How long a clone's fault handler polls for the next fault (yielding the core) before it
/// sleeps, by default. A clone warming up faults every few hundred microseconds, and on this
/// host a sleeping handler costs each fault two slow wake-ups: with 500 us of polling a lazy
/// web / olap / compress clone lost 82 / 111 / 157 ms to warming up instead of 187 / 218 /
/// 314 ms, and its first response came after 48 / 167 / 235 ms instead of 75 / 251 / 399 ms
/// (`kscope bench warmup --fault-spin-us`, `docs/BENCHMARKS.md` section 10). A handler polls
/// only after a fault, so an idle clone costs nothing.
pub const FAULT_SPIN: Duration = Duration::from_micros(500);

/// Options of [`Vm::clone_children`].
#[derive(Clone)]
pub struct CloneOptions {
    /// Lazy or eager memory.
    pub memory: MemoryMode,
    /// Prefetch policy per lazy clone (default: [`crate::prefetch::OnDemand`]).
    pub prefetcher: Option<PrefetcherFactory>,
    /// Children are named `<name_prefix><index>` (default: `<parent>-c`).
    pub name_prefix: String,
    /// Create the children paused ([`Vm::resume`] starts them): their memory equals the image
    /// until they run.
    pub start_paused: bool,
    /// Fault handlers poll this long after their queue runs dry (see
    /// [`ServerOptions::spin`](crate::lazy::ServerOptions)); default [`FAULT_SPIN`].
    pub fault_spin: Duration,
    /// Lazy children get anonymous `MAP_PRIVATE` memory ([`RegionKind::AnonPrivate`]) instead
    /// of a memfd: Linux KSM can then merge their live pages copy-on-write (see
    /// [`Vm::mark_mergeable`]), but such a child cannot be frozen (cloned again or
    /// snapshotted). Ignored for eager children. Default false.
    ///
    /// [`RegionKind::AnonPrivate`]: crate::lazy::RegionKind::AnonPrivate
    pub anon_memory: bool,
    /// Start the children of the call together, once every one is made, instead of each as
    /// soon as it is made (default false). The first child then starts later, but the last
    /// one sooner: children that already run compete with the creation of the others for the
    /// host's cores (measured in `docs/BENCHMARKS.md` section 10). Ignored with
    /// `start_paused`.
    pub start_together: bool,
    /// Pre-created VM shells ([`ShellPool`]) that lazy memfd children take instead of making
    /// their own; an empty pool (or none) means the direct, slower path. Default none.
    pub pool: Option<Arc<ShellPool>>,
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions {
            memory: MemoryMode::Lazy,
            prefetcher: None,
            name_prefix: String::new(),
            start_paused: false,
            fault_spin: FAULT_SPIN,
            anon_memory: false,
            start_together: false,
            pool: None,
        }
    }
}

impl std::fmt::Debug for CloneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneOptions")
            .field("memory", &self.memory)
            .field("prefetcher", &self.prefetcher.is_some())
            .field("name_prefix", &self.name_prefix)
            .field("start_paused", &self.start_paused)
            .field("start_together", &self.start_together)
            .field("anon_memory", &self.anon_memory)
            .field("pool", &self.pool.as_ref().map(|p| p.capacity()))
            .finish()
    }
}

/// The result of [`Generation::spawn`] (and [`Vm::clone_children`]).
#[derive(Debug)]
pub struct CloneBatch {
    /// The children, in index order.
    pub children: Vec<Vm>,
    /// How long the parent's vCPUs were out of the guest for the freeze of the generation.
    pub parent_pause: Duration,
    /// Per child: from the call ([`Vm::clone_children`]: including the freeze;
    /// [`Generation::spawn`]: from the spawn) to the child's first `KVM_RUN` (for paused
    /// children: to the moment it was ready to run).
    pub clone_latency: Vec<Duration>,
    /// Per child: time spent creating it (KVM VM, memory, state); children of one call are
    /// created in parallel (one worker per available core), so these overlap.
    pub create_time: Vec<Duration>,
    /// Per child: where its creation time went.
    pub breakdown: Vec<SpawnBreakdown>,
    /// The image the children are served from.
    pub generation: Arc<Generation>,
    /// Breakdown of the freeze that made the generation.
    pub freeze: FreezeReport,
    /// Wall time of the whole call.
    pub total: Duration,
}

/// The cores this process may use (read once: `available_parallelism` reads cgroup files,
/// 20-100 us, which a clone call should not spend).
fn host_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |c| c.get()))
}

/// One child made by a spawn worker: the VM (or why not), its creation time, and when it was
/// ready.
type Made = (Result<(Vm, SpawnBreakdown), VmError>, Duration, Instant);

impl Generation {
    /// Create `n` children of this generation (see the module docs). Nothing here colors or
    /// freezes: a policy factory in `opts` is called once per child.
    pub fn spawn(self: &Arc<Self>, n: usize, opts: &CloneOptions) -> Result<CloneBatch, VmError> {
        self.spawn_from(Instant::now(), n, opts)
    }

    fn spawn_from(
        self: &Arc<Self>,
        t_call: Instant,
        n: usize,
        opts: &CloneOptions,
    ) -> Result<CloneBatch, VmError> {
        let prefix = if opts.name_prefix.is_empty() {
            format!("{}-c", self.parent_name())
        } else {
            opts.name_prefix.clone()
        };
        // Children are created in parallel, by at most one worker per available core; each
        // worker takes the next index, so the batch keeps its order and the first error (by
        // index) is returned. Children made before an error are dropped (stopped).
        let workers = host_cores().min(n).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let hold = opts.start_together && !opts.start_paused;
        let make = |i: usize| -> Made {
            let t0 = Instant::now();
            let spec = child::ChildSpec {
                name: format!("{prefix}{i}"),
                index: i,
                memory: opts.memory,
                prefetcher: opts.prefetcher.clone(),
                start_paused: opts.start_paused || hold,
                fault_spin: opts.fault_spin,
                anon_memory: opts.anon_memory,
                identity: true,
                pool: opts.pool.clone(),
            };
            let r = child::spawn_timed(self, &spec);
            (r, t0.elapsed(), Instant::now())
        };
        let mut made: Vec<Option<Made>> = (0..n).map(|_| None).collect();
        if workers == 1 {
            for (i, slot) in made.iter_mut().enumerate() {
                *slot = Some(make(i));
            }
        } else {
            let parts: Vec<Vec<(usize, Made)>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..workers)
                    .map(|_| {
                        s.spawn(|| {
                            let mut mine = Vec::new();
                            loop {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                if i >= n {
                                    break mine;
                                }
                                mine.push((i, make(i)));
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            });
            for (i, r) in parts.into_iter().flatten() {
                made[i] = Some(r);
            }
        }
        let mut children = Vec::with_capacity(n);
        let mut create_time = Vec::with_capacity(n);
        let mut ready_at = Vec::with_capacity(n);
        let mut breakdown = Vec::with_capacity(n);
        for r in made {
            let (vm, took, ready) = r.expect("every index is taken by one worker");
            let (vm, times) = vm?;
            children.push(vm);
            breakdown.push(times);
            create_time.push(took);
            ready_at.push(ready);
        }
        if hold {
            for c in &children {
                c.resume()?;
            }
        }
        let clone_latency = children
            .iter()
            .zip(&ready_at)
            .map(|(c, &ready)| match opts.start_paused {
                true => ready - t_call,
                false => c.wait_first_run(Duration::from_secs(5)).unwrap_or(ready) - t_call,
            })
            .collect();
        Ok(CloneBatch {
            children,
            parent_pause: self.freeze.pause,
            clone_latency,
            create_time,
            breakdown,
            generation: self.clone(),
            freeze: self.freeze,
            total: t_call.elapsed(),
        })
    }
}

impl Vm {
    /// Clone this VM `n` times: [`Vm::freeze`] then [`Generation::spawn`]. The VM must be
    /// running or paused; a paused VM stays paused.
    pub fn clone_children(&self, n: usize, opts: &CloneOptions) -> Result<CloneBatch, VmError> {
        let t_call = Instant::now();
        let (generation, chores) = self.freeze_staged()?;
        let batch = generation.spawn_from(t_call, n, opts);
        chores.run();
        batch
    }
}
