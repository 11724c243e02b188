//! Live cloning of a running VM (SnowFlock/Kaleidoscope style).
//!
//! [`Vm::clone_children`] freezes the parent's memory as a copy-on-write *generation image*
//! ([`Generation`], see [`freeze`] for how the pause stays short) and creates `n` children, each
//! a new KVM VM that resumes exactly where the parent was: same vCPU state (registers, XSAVE,
//! MSRs, events, clock), same device state (serial, virtio-mmio transports and queues), same
//! memory. Memory per [`MemoryMode`]: `Lazy` children start with nothing and fault every page in
//! from the image through userfaultfd (driven by a [`Prefetcher`]); `Eager` children get a full
//! copy first. Each child's GenPage carries a new generation, its clone id, fresh randomness
//! and an identity, written before its first instruction; the guest kernel reacts with
//! SIGCLONE.

pub(crate) mod child;
pub mod freeze;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::devices::DeviceStates;
use crate::error::VmError;
use crate::hypervisor::kvm::KvmVcpuState;
use crate::lazy::{PageSource, StatsSnapshot, PAGE_SIZE};
use crate::prefetch::Prefetcher;
use crate::vm::{Vm, VmConfig, VmState};

pub use freeze::{FreezeReport, ParentState};

/// How a child's memory is filled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryMode {
    /// Start empty; serve each page on first touch from the generation image (userfaultfd),
    /// plus whatever the prefetcher asks for. Untouched pages are never allocated.
    #[default]
    Lazy,
    /// Copy every non-zero page before the child runs (the baseline).
    Eager,
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
    /// [`ServerOptions::spin`](crate::lazy::ServerOptions)).
    pub fault_spin: Duration,
    /// Lazy children get anonymous `MAP_PRIVATE` memory ([`RegionKind::AnonPrivate`]) instead
    /// of a memfd: Linux KSM can then merge their live pages copy-on-write (see
    /// [`Vm::mark_mergeable`]), but such a child cannot be frozen (cloned again or
    /// snapshotted). Ignored for eager children. Default false.
    ///
    /// [`RegionKind::AnonPrivate`]: crate::lazy::RegionKind::AnonPrivate
    pub anon_memory: bool,
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions {
            memory: MemoryMode::Lazy,
            prefetcher: None,
            name_prefix: String::new(),
            start_paused: false,
            fault_spin: Duration::ZERO,
            anon_memory: false,
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
            .field("anon_memory", &self.anon_memory)
            .finish()
    }
}

/// Everything a VM needs to resume: vCPU and device state and the KVM clock. Serializable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// One state per vCPU.
    pub vcpus: Vec<KvmVcpuState>,
    /// Device state.
    pub devices: DeviceStates,
    /// KVM clock (`None` if KVM_GET_CLOCK failed).
    pub clock: Option<kvm_bindings::kvm_clock_data>,
    /// The parent's READY value.
    pub ready_value: u32,
}

/// A frozen generation image: the parent's memory and machine state at the clone point. Lives
/// as long as the parent or any child refers to it; never written.
pub struct Generation {
    pub(crate) id: u64,
    pub(crate) image: Arc<dyn PageSource>,
    pub(crate) state: MachineState,
    pub(crate) cfg: VmConfig,
    pub(crate) created: Instant,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .field("parent", &self.cfg.name)
            .field("pages", &self.image.pages())
            .finish()
    }
}

impl Generation {
    /// Process-unique id of this image.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The frozen memory.
    pub fn image(&self) -> &Arc<dyn PageSource> {
        &self.image
    }

    /// Name of the VM it was frozen from.
    pub fn parent_name(&self) -> &str {
        &self.cfg.name
    }

    /// Guest RAM size.
    pub fn mem_bytes(&self) -> u64 {
        self.cfg.mem_bytes
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.image.pages()
    }

    /// The captured machine state.
    pub fn machine_state(&self) -> &MachineState {
        &self.state
    }

    /// When it was frozen.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Read guest-physical memory of the image.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.mem_bytes())
            .ok_or(VmError::GuestMemory {
                gpa,
                len: buf.len(),
            })?;
        let mut page = [0u8; PAGE_SIZE];
        let mut at = gpa;
        while at < end {
            let g = at / PAGE_SIZE as u64;
            let off = (at % PAGE_SIZE as u64) as usize;
            self.image.read_page(g, &mut page)?;
            let n = (PAGE_SIZE - off).min((end - at) as usize);
            let dst = (at - gpa) as usize;
            buf[dst..dst + n].copy_from_slice(&page[off..off + n]);
            at += n as u64;
        }
        Ok(())
    }
}

/// The result of [`Vm::clone_children`].
#[derive(Debug)]
pub struct CloneBatch {
    /// The children, in index order.
    pub children: Vec<Vm>,
    /// How long the parent's vCPUs were out of the guest.
    pub parent_pause: Duration,
    /// Per child: from the call to the child's first `KVM_RUN` (for paused children: to the
    /// moment it was ready to run).
    pub clone_latency: Vec<Duration>,
    /// Per child: time spent creating it (KVM VM, memory, state), excluding earlier children.
    pub create_time: Vec<Duration>,
    /// The image the children are served from.
    pub generation: Arc<Generation>,
    /// Breakdown of the freeze.
    pub freeze: FreezeReport,
    /// Wall time of the whole call.
    pub total: Duration,
}

/// Memory counters of a VM (see [`Vm::memory_stats`]).
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

impl Vm {
    /// Clone this VM `n` times (see the module docs). The VM must be running or paused; a
    /// paused VM stays paused.
    pub fn clone_children(&self, n: usize, opts: &CloneOptions) -> Result<CloneBatch, VmError> {
        let t_call = Instant::now();
        let (generation, freeze) = self.freeze()?;
        let prefix = if opts.name_prefix.is_empty() {
            format!("{}-c", self.name())
        } else {
            opts.name_prefix.clone()
        };
        let mut children = Vec::with_capacity(n);
        let mut create_time = Vec::with_capacity(n);
        let mut ready_at = Vec::with_capacity(n);
        for i in 0..n {
            let t0 = Instant::now();
            let spec = child::ChildSpec {
                name: format!("{prefix}{i}"),
                index: i,
                memory: opts.memory,
                prefetcher: opts.prefetcher.clone(),
                start_paused: opts.start_paused,
                fault_spin: opts.fault_spin,
                anon_memory: opts.anon_memory,
                identity: true,
            };
            children.push(child::spawn(&generation, &spec)?);
            create_time.push(t0.elapsed());
            ready_at.push(Instant::now());
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
            parent_pause: freeze.pause,
            clone_latency,
            create_time,
            generation,
            freeze,
            total: t_call.elapsed(),
        })
    }

    /// Memory counters: fault service for lazy VMs, footprint for all.
    pub fn memory_stats(&self) -> MemoryStats {
        let footprint = freeze::footprint(self).unwrap_or(0);
        match &self.lazy {
            Some(server) => {
                let s = server.stats();
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
                    footprint_bytes: footprint,
                    server: Some(s),
                }
            }
            None => MemoryStats {
                footprint_bytes: footprint,
                ..Default::default()
            },
        }
    }

    /// The generation image this VM was cloned from (`None` for a booted or restored VM).
    pub fn generation(&self) -> Option<Arc<Generation>> {
        self.origin.clone()
    }

    /// The clone id written into this VM's GenPage (`None` if it is not a clone).
    pub fn clone_id(&self) -> Option<u64> {
        self.clone_id
    }

    /// Wait until the VM's first `KVM_RUN` and return its time.
    pub fn wait_first_run(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.first_run.get() {
                return Some(*t);
            }
            if Instant::now() >= deadline || !matches!(self.state(), VmState::Running) {
                return None;
            }
            std::thread::yield_now();
        }
    }
}
