//! The registry of VMs the service runs: parents and clones, their relations, limits
//! accounting and per-VM request statistics.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kscope_vmm::{Vm, VmState};
use kscope_workloads::Workload;
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::metrics::Gauges;
use kscope_vmm::summary::LatencySummary;

/// Latency samples kept per VM for its summary.
pub const LATENCY_WINDOW: usize = 4096;

/// Limits on what the service runs at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Parent VMs.
    pub max_vms: usize,
    /// Clones (over all parents).
    pub max_clones: usize,
    /// Guest RAM committed to all live VMs together (see [`limits`](super::limits): parents
    /// and eager clones count their full size, lazy clones `size / overcommit` or their real
    /// footprint if larger).
    pub max_guest_mem: u64,
    /// Overcommit ratio of lazy clones (1 = each counts its full size).
    pub overcommit: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vms: 16,
            max_clones: 256,
            max_guest_mem: 8 << 30,
            overcommit: 1.0,
        }
    }
}

/// Parent or clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// Booted from a workload image (or restored).
    Parent,
    /// Cloned from another VM.
    Clone,
}

/// Wire view of a clone's identity (`Identity` in the spec), from the VMM's
/// [`kscope_vmm::Vm::identity`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityView {
    /// The clone id the VMM wrote into the clone's GenPage.
    pub clone_id: u64,
    /// MAC address the clone would use on a network.
    pub mac: String,
    /// IP address the clone would use on a network.
    pub ip: String,
}

/// Wire view of a VM's memory statistics (`MemoryStats` in the spec), a summary of the VMM's
/// [`kscope_vmm::MemoryStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemoryStatsView {
    /// True if the VM's memory is served lazily (a lazy clone or restored VM).
    pub lazy: bool,
    /// Page faults served.
    pub faults: u64,
    /// Pages installed (on fault, prefetched, zero-filled).
    pub pages_fetched: u64,
    /// Host memory owned by this VM alone.
    pub footprint_bytes: u64,
    /// Prefetch policy (clones).
    pub policy: Option<String>,
}

/// Request statistics of one VM.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests failed.
    pub errors: AtomicU64,
    /// Requests in flight.
    pub in_flight: AtomicU64,
    window: Mutex<VecDeque<Duration>>,
}

impl RequestStats {
    /// Record an answered request.
    pub fn record(&self, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() == LATENCY_WINDOW {
            w.pop_front();
        }
        w.push_back(latency);
    }

    /// Summary of the latency window.
    pub fn latency(&self) -> LatencySummary {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        LatencySummary::of(w.make_contiguous())
    }
}

/// One VM of the registry.
pub struct VmEntry {
    /// Id (`vm-N`).
    pub id: String,
    /// Parent or clone.
    pub kind: VmKind,
    /// The parent (clones).
    pub parent: Option<String>,
    /// The workload it runs.
    pub workload: Workload,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// The VM.
    pub vm: Vm,
    /// The clone's identity.
    pub identity: Option<IdentityView>,
    /// Boot (or clone) time.
    pub boot: Duration,
    /// Request statistics.
    pub stats: RequestStats,
    /// Ids of its clones.
    pub children: Mutex<Vec<String>>,
    /// Prefetch policy (clones).
    pub policy: Option<String>,
    /// Set once the failure has been counted.
    pub failure_counted: AtomicBool,
    /// Bytes charged against `max_guest_mem` at creation.
    pub charge: u64,
    /// Set when the VM is deleted (requests in flight then answer 410).
    pub deleted: AtomicBool,
}

impl VmEntry {
    /// The entry of a parent VM (booted or restored) that has just become ready.
    pub fn parent(id: String, workload: Workload, vm: Vm, boot: Duration) -> VmEntry {
        let charge = vm.mem_bytes();
        VmEntry {
            id,
            kind: VmKind::Parent,
            parent: None,
            workload,
            mem_bytes: vm.mem_bytes(),
            vm,
            identity: None,
            boot,
            stats: RequestStats::default(),
            children: Default::default(),
            policy: None,
            failure_counted: Default::default(),
            charge,
            deleted: Default::default(),
        }
    }

    /// True for a clone whose memory is served lazily (charged with overcommit).
    pub fn lazy_clone(&self) -> bool {
        self.kind == VmKind::Clone && self.charge < self.mem_bytes
    }
}

impl std::fmt::Debug for VmEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEntry")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("vm", &self.vm)
            .finish()
    }
}

/// JSON view of a VM's statistics (`VmStats` in the spec).
#[derive(Debug, Clone, Serialize)]
pub struct VmStatsView {
    /// Requests answered.
    pub requests: u64,
    /// Requests failed.
    pub errors: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Latency over the last [`LATENCY_WINDOW`] requests.
    pub latency: LatencySummary,
    /// Memory statistics from the VMM.
    pub memory: MemoryStatsView,
}

/// JSON view of a VM (`Vm` in the spec).
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// Id.
    pub id: String,
    /// Parent or clone.
    pub kind: VmKind,
    /// Parent id.
    pub parent: Option<String>,
    /// Workload name.
    pub workload: &'static str,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// The CPU mode the guest kernel reported.
    pub cpu_mode: Option<kscope_vmm::CpuMode>,
    /// State name.
    pub state: &'static str,
    /// Why it failed.
    pub error: Option<String>,
    /// Boot or clone time.
    pub boot_ms: Option<f64>,
    /// Clone identity.
    pub identity: Option<IdentityView>,
    /// Where to send requests.
    pub request_url: String,
    /// The VM's IPv4 address (VMs with a network): its workload serves HTTP on port 80.
    pub address: Option<String>,
    /// The network namespace the address lives in (VMs with a network).
    pub netns: Option<String>,
    /// Ids of its clones.
    pub clones: Vec<String>,
    /// Statistics.
    pub stats: VmStatsView,
}

impl VmEntry {
    /// Statistics view.
    pub fn stats_view(&self) -> VmStatsView {
        VmStatsView {
            requests: self.stats.requests.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
            in_flight: self.stats.in_flight.load(Ordering::Relaxed),
            latency: self.stats.latency(),
            memory: self.memory(),
        }
    }

    /// Memory statistics from the VMM.
    pub fn memory(&self) -> MemoryStatsView {
        let m = self.vm.memory_stats();
        MemoryStatsView {
            lazy: m.lazy,
            faults: m.faults,
            pages_fetched: m.pages_fetched + m.pages_prefetched + m.zero_filled,
            footprint_bytes: m.footprint_bytes,
            policy: self.policy.clone(),
        }
    }

    /// Full view.
    pub fn view(&self) -> VmView {
        let (state, error) = state_name(&self.vm.state());
        VmView {
            id: self.id.clone(),
            kind: self.kind,
            parent: self.parent.clone(),
            workload: self.workload.name(),
            memory_bytes: self.mem_bytes,
            cpu_mode: self.vm.cpu_mode(),
            state,
            error,
            boot_ms: Some(self.boot.as_secs_f64() * 1e3),
            identity: self.identity.clone(),
            request_url: request_url(&self.id),
            address: self.vm.net_address().map(|a| a.to_string()),
            netns: self.vm.net_attach().map(|n| n.network.netns().to_string()),
            clones: self
                .children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            stats: self.stats_view(),
        }
    }
}

/// The request URL of VM `id`.
pub fn request_url(id: &str) -> String {
    format!("/v1/vms/{id}/requests")
}

/// The API's name of a VM state and the failure reason.
pub fn state_name(s: &VmState) -> (&'static str, Option<String>) {
    match s {
        VmState::Booting => ("booting", None),
        VmState::Running => ("running", None),
        VmState::Paused => ("paused", None),
        VmState::Stopped => ("stopped", None),
        VmState::Failed(e) => ("failed", Some(e.clone())),
    }
}

#[derive(Debug, Default)]
struct Usage {
    parents: usize,
    clones: usize,
    mem: u64,
}

/// A reservation of capacity, released on drop unless committed by inserting VMs.
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<Registry>,
    parents: usize,
    clones: usize,
    mem: u64,
}

impl Reservation {
    /// Give back the part of the reservation of `clones` clones of `mem_each` bytes that was
    /// not used (e.g. fewer clones were made).
    pub fn shrink_clones(&mut self, unused: usize, mem_each: u64) {
        let unused = unused.min(self.clones);
        self.registry
            .release(0, unused, mem_each.saturating_mul(unused as u64));
        self.clones -= unused;
        self.mem = self.mem.saturating_sub(mem_each * unused as u64);
    }

    /// The VMs were registered: their capacity is now accounted to them.
    pub fn commit(mut self) {
        self.parents = 0;
        self.clones = 0;
        self.mem = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.registry.release(self.parents, self.clones, self.mem);
    }
}

/// Every VM of the service.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    vms: Mutex<HashMap<String, Arc<VmEntry>>>,
    usage: Mutex<Usage>,
    next_id: AtomicU64,
    generation: AtomicU64,
    /// Counter totals of deleted and stopped VMs (so that the service's counters never
    /// fall), and the deleted VMs still stopping (counted live until then).
    retired: Mutex<Retired>,
}

/// Fault-server counters of deleted VMs.
#[derive(Debug, Default)]
struct Retired {
    faults: u64,
    pages_fetched: u64,
    stopping: Vec<Arc<VmEntry>>,
}

impl Registry {
    /// An empty registry enforcing `limits`.
    pub fn new(limits: Limits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            vms: Mutex::default(),
            usage: Mutex::default(),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(1),
            retired: Mutex::default(),
        })
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A fresh VM id.
    pub fn new_id(&self) -> String {
        format!("vm-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A fresh clone generation number (for identities).
    pub fn new_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserve capacity for `parents` parents and `clones` clones using `mem` bytes, or 429.
    pub fn reserve(
        self: &Arc<Self>,
        parents: usize,
        clones: usize,
        mem: u64,
    ) -> ApiResult<Reservation> {
        let grown = self.footprint_growth();
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let l = self.limits;
        if u.parents + parents > l.max_vms {
            return Err(ApiError::Limit(format!(
                "{} of {} parent VMs are in use; delete one (DELETE /v1/vms/{{id}}) or start the service with a larger --max-vms",
                u.parents, l.max_vms
            )));
        }
        if u.clones + clones > l.max_clones {
            return Err(ApiError::Limit(format!(
                "{} of {} clones are in use and {clones} more were asked for; delete clones or start the service with a larger --max-clones",
                u.clones, l.max_clones
            )));
        }
        let used = u.mem.saturating_add(grown);
        if used.saturating_add(mem) > l.max_guest_mem {
            return Err(ApiError::Limit(format!(
                "{} MiB of {} MiB guest memory are committed ({} MiB of it grown by lazy clones past their overcommitted share, overcommit ratio {}) and {} MiB more were asked for; delete VMs, use less memory or start the service with a larger --max-guest-mem or --overcommit",
                used >> 20,
                l.max_guest_mem >> 20,
                grown >> 20,
                l.overcommit,
                mem >> 20
            )));
        }
        u.parents += parents;
        u.clones += clones;
        u.mem += mem;
        Ok(Reservation {
            registry: self.clone(),
            parents,
            clones,
            mem,
        })
    }

    fn release(&self, parents: usize, clones: usize, mem: u64) {
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        u.parents = u.parents.saturating_sub(parents);
        u.clones = u.clones.saturating_sub(clones);
        u.mem = u.mem.saturating_sub(mem);
    }

    /// Register a VM (its capacity must have been reserved).
    pub fn insert(&self, e: Arc<VmEntry>) {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = e.parent.as_ref().and_then(|p| vms.get(p)) {
            p.children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.id.clone());
        }
        vms.insert(e.id.clone(), e);
    }

    /// The VM `id`, or 404.
    pub fn get(&self, id: &str) -> ApiResult<Arc<VmEntry>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!("no VM {id:?}; list the VMs with GET /v1/vms"))
            })
    }

    /// Every VM, by id order.
    pub fn list(&self) -> Vec<Arc<VmEntry>> {
        let mut v: Vec<_> = self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|e| {
            e.id.trim_start_matches("vm-")
                .parse::<u64>()
                .unwrap_or(u64::MAX)
        });
        v
    }

    /// Remove `id` and (recursively) its clones from the registry and release their capacity.
    /// Returns the removed entries, clones first; the caller stops them.
    pub fn remove_tree(&self, id: &str) -> ApiResult<Vec<Arc<VmEntry>>> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let root = vms.get(id).cloned().ok_or_else(|| {
            ApiError::NotFound(format!("no VM {id:?}; list the VMs with GET /v1/vms"))
        })?;
        let mut order = vec![root];
        let mut i = 0;
        while i < order.len() {
            let kids = order[i]
                .children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            order.extend(kids.iter().filter_map(|k| vms.get(k).cloned()));
            i += 1;
        }
        let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        for e in &order {
            vms.remove(&e.id);
            e.deleted.store(true, Ordering::Release);
            r.stopping.push(e.clone());
        }
        drop(r);
        if let Some(p) = order[0].parent.as_ref().and_then(|p| vms.get(p)) {
            p.children
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|c| c != id);
        }
        drop(vms);
        for e in &order {
            let (parents, clones) = match e.kind {
                VmKind::Parent => (1, 0),
                VmKind::Clone => (0, 1),
            };
            self.release(parents, clones, e.charge);
        }
        order.reverse();
        Ok(order)
    }

    /// A VM removed by [`Registry::remove_tree`] has stopped: its final counters join the
    /// totals of deleted VMs.
    pub fn retire(&self, e: &Arc<VmEntry>) {
        let m = e.memory();
        let _vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = r.stopping.iter().position(|x| Arc::ptr_eq(x, e)) {
            r.stopping.swap_remove(i);
            r.faults += m.faults;
            r.pages_fetched += m.pages_fetched;
        }
    }

    /// Bytes by which lazy clones' real footprints exceed what they were charged.
    fn footprint_growth(&self) -> u64 {
        if self.limits.overcommit <= 1.0 {
            return 0;
        }
        self.list()
            .iter()
            .filter(|e| e.lazy_clone())
            .map(|e| e.vm.memory_stats().footprint_bytes.saturating_sub(e.charge))
            .sum()
    }

    /// Remove every VM (shutdown); the caller stops them.
    pub fn drain(&self) -> Vec<Arc<VmEntry>> {
        let all: Vec<_> = self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, e)| e)
            .collect();
        *self.usage.lock().unwrap_or_else(|p| p.into_inner()) = Usage::default();
        all
    }

    /// Gauges for `/metrics`. The fault counters include deleted VMs' totals (read under the
    /// registry lock, so a VM being deleted is counted once, never twice or not at all).
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            guest_memory: self.usage.lock().unwrap_or_else(|p| p.into_inner()).mem,
            ..Gauges::default()
        };
        let live: Vec<(Arc<VmEntry>, MemoryStatsView)> = {
            let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            let r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            g.faults = r.faults;
            g.pages_fetched = r.pages_fetched;
            for e in &r.stopping {
                let m = e.memory();
                g.faults += m.faults;
                g.pages_fetched += m.pages_fetched;
            }
            vms.values().map(|e| (e.clone(), e.memory())).collect()
        };
        for (e, m) in live {
            match e.kind {
                VmKind::Parent => g.parents += 1,
                VmKind::Clone => g.clones += 1,
            }
            match e.vm.state() {
                VmState::Running | VmState::Booting => g.running += 1,
                VmState::Paused => g.paused += 1,
                VmState::Failed(_) => g.failed += 1,
                VmState::Stopped => {}
            }
            g.faults += m.faults;
            g.pages_fetched += m.pages_fetched;
            g.footprint += m.footprint_bytes;
        }
        g
    }
}
