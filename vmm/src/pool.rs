//! A pool of pre-created VM *shells*: everything of a lazy clone that does not depend on the
//! generation it is cloned from, made ahead of time so that [`Generation::spawn`] only has to
//! fill it in.
//!
//! A [`Shell`] is a KVM VM with its memory slot 0 already mapped onto a fresh, empty
//! destination region (a memfd mapped shared and registered with its own userfaultfd, see
//! [`LazyRegion`]) and its vCPUs created with their CPUID set. Measured with
//! `kscope bench clone` (`docs/BENCHMARKS.md`, section 10), these are most of a child's creation
//! time: `KVM_SET_USER_MEMORY_REGION` alone takes 1-20 ms on a loaded PVM host (it waits for
//! an SRCU grace period and sizes per-page metadata), `KVM_CREATE_VM` and `KVM_CREATE_VCPU`
//! another 0.2-3 ms. What stays on the clone path is what depends on the generation: the fault
//! server (its source and policy), the vCPU and device state, the GenPage, the vCPU threads.
//!
//! Shells are keyed by what must match ([`ShellKey`]: guest memory size and vCPU count). A
//! [`ShellPool`] keeps at most `capacity` shells in total, for the key asked for most recently
//! ([`ShellPool::prepare`] or a take); one background thread refills it once no shell was
//! taken for 20 ms (so that it never competes with a clone call for the locks shell creation
//! takes). Taking never waits: an empty pool is a *miss*
//! and the caller creates the shell itself (the slower path). Dropping the pool stops and joins
//! its thread, then closes every shell (VM, vCPU, memfd and userfaultfd descriptors).
//!
//! A pooled shell also holds its VM's threads, started and waiting (one for the fault handler,
//! one per vCPU, [`Parked`]), so that the clone path starts none.
//!
//! Cost of one shell while it waits: `3 + vcpus` descriptors, `1 + vcpus` idle threads, no
//! guest memory (the memfd is
//! empty, the mapping is only reserved address space), and the kernel's per-VM, per-vCPU and
//! per-slot structures (measured by `kscope bench clone`: see `PoolStats` and
//! `docs/BENCHMARKS.md`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::VmError;
use crate::hostmem::PAGE_SIZE;
use crate::hypervisor::{self, HvVcpu, HvVm};
use crate::lazy::{LazyRegion, RegionKind};
use crate::state;
use crate::worker::Parked;

#[cfg(doc)]
use crate::Generation;

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The refill thread could not be started.
    #[error("cannot start the VM pool's refill thread: {0}; raise the process's thread limit or run without a pool (size 0)")]
    Thread(String),
    /// A shell could not be created.
    #[error("cannot create a VM shell of {mem_mib} MiB with {vcpus} vCPUs: {source}; the pool retries with backoff and clones make their own VMs meanwhile; if this persists, check the open-file, thread and memory limits or lower the pool size")]
    Create {
        /// Guest memory of the shell, MiB.
        mem_mib: u64,
        /// vCPUs of the shell.
        vcpus: u32,
        /// Why.
        source: VmError,
    },
}

impl From<PoolError> for VmError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Create { source, .. } => source,
            other => VmError::Internal(other.to_string()),
        }
    }
}

/// What a shell must match to be used for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ShellKey {
    /// Guest memory in bytes (the size of slot 0 and of the destination region).
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
}

/// Time spent making a shell, per part (they are the same phases as a child made without a
/// pool, see [`crate::SpawnBreakdown`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ShellTimes {
    pub create_vm: Duration,
    pub memory: Duration,
    pub memory_slot: Duration,
    pub vcpus: Duration,
}

/// A KVM VM with its memory slot mapped onto an empty userfaultfd-registered region and its
/// vCPUs created (CPUID set), ready to receive a generation's state.
///
/// Fields drop in order: the waiting threads (they end), the vCPUs, then the VM (which
/// removes the slot), then the region.
#[derive(Debug)]
pub struct Shell {
    /// Threads started ahead of time: the fault handler's, then one per vCPU.
    threads: Vec<Parked>,
    vcpus: Vec<Box<dyn HvVcpu>>,
    hv: Box<dyn HvVm>,
    region: LazyRegion,
    key: ShellKey,
}

/// The parts of a [`Shell`], taken over by a VM.
pub(crate) struct ShellParts {
    /// The VM; its slot 0 maps `region`: keep the region alive until the VM is closed.
    pub hv: Box<dyn HvVm>,
    /// The vCPUs, CPUID set, no state yet.
    pub vcpus: Vec<Box<dyn HvVcpu>>,
    /// The destination memory, empty.
    pub region: LazyRegion,
    /// A thread for the fault handler.
    pub handler_thread: Option<Parked>,
    /// Threads for the vCPUs.
    pub vcpu_threads: Vec<Parked>,
}

impl Shell {
    /// Make a shell for `key` (the direct path; the pool's thread calls it too).
    pub(crate) fn create(key: ShellKey) -> Result<(Shell, ShellTimes), PoolError> {
        let err = |source: VmError| PoolError::Create {
            mem_mib: key.mem_bytes >> 20,
            vcpus: key.vcpus,
            source,
        };
        let mut t = ShellTimes::default();
        let t0 = Instant::now();
        let hv = hypervisor::host().create_vm().map_err(err)?;
        let t1 = Instant::now();
        t.create_vm = t1 - t0;
        let region = LazyRegion::new(key.mem_bytes / PAGE_SIZE as u64, RegionKind::SharedMemfd)
            .map_err(|e| err(e.into()))?;
        let t2 = Instant::now();
        t.memory = t2 - t1;
        // SAFETY: the region is a live, writable mapping of `mem_bytes` bytes. In the shell the
        // VM (field `hv`) drops before the region; a VM that takes the parts over keeps the
        // region (behind its fault server, in its guest RAM) until after its KVM VM is closed.
        unsafe {
            hv.set_memory_slot(0, 0, region.len(), region.host_addr() as *mut u8)
                .map_err(err)?
        };
        let t3 = Instant::now();
        t.memory_slot = t3 - t2;
        let vcpus = state::create_vcpus(hv.as_ref(), key.vcpus).map_err(err)?;
        t.vcpus = t3.elapsed();
        Ok((
            Shell {
                threads: Vec::new(),
                vcpus,
                hv,
                region,
                key,
            },
            t,
        ))
    }

    /// What this shell fits.
    pub fn key(&self) -> ShellKey {
        self.key
    }

    /// Start the threads the VM will run on (one for the fault handler, one per vCPU):
    /// done for pooled shells only, a shell made on the clone path starts them as it goes.
    fn start_threads(&mut self) -> Result<(), PoolError> {
        for _ in 0..=self.key.vcpus {
            let p = Parked::start().map_err(|e| PoolError::Thread(e.to_string()))?;
            self.threads.push(p);
        }
        Ok(())
    }

    pub(crate) fn into_parts(self) -> ShellParts {
        let Shell {
            mut threads,
            vcpus,
            hv,
            region,
            ..
        } = self;
        let handler_thread = (!threads.is_empty()).then(|| threads.remove(0));
        ShellParts {
            hv,
            vcpus,
            region,
            handler_thread,
            vcpu_threads: threads,
        }
    }
}

/// Counters of a [`ShellPool`] (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Most shells kept (0: no pool).
    pub capacity: usize,
    /// Shells ready now.
    pub ready: usize,
    /// VMs made from a pooled shell.
    pub hits: u64,
    /// VMs that found no shell and made their own (the slower path).
    pub misses: u64,
    /// Shells made by the refill thread.
    pub created: u64,
    /// Shells the refill thread failed to make (it retries after a pause).
    pub failed: u64,
    /// Shells dropped unused (another key became the wanted one).
    pub evicted: u64,
}

/// Up to this many keys are remembered (most recent first); only the first is refilled.
const MAX_KEYS: usize = 4;
/// After a failed shell the refill thread waits this long before it tries again, doubling
/// after every further failure up to [`RETRY_MAX`].
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// The longest wait between two failed attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The refill thread starts this long after the last take: a clone call (and its children's
/// first instructions) never competes with shell creation, which takes the process's
/// `mmap_lock` for writing (mappings, userfaultfd registration, KVM's MMU notifier) and
/// global KVM locks. The thread runs at normal priority: a lowered one was measured to make
/// clones wait for it while it held those locks (priority inversion).
const QUIET_AFTER_TAKE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Store {
    shells: HashMap<ShellKey, Vec<Shell>>,
    /// Keys asked for, most recent first.
    wanted: Vec<ShellKey>,
    /// Refilling is held ([`ShellPool::hold_refill`]).
    held: bool,
    /// When a shell was last taken or asked for (see [`QUIET_AFTER_TAKE`]).
    last_take: Option<Instant>,
    stop: bool,
    last_error: Option<String>,
}

impl Store {
    fn total(&self) -> usize {
        self.shells.values().map(Vec::len).sum()
    }

    fn count(&self, key: &ShellKey) -> usize {
        self.shells.get(key).map_or(0, Vec::len)
    }

    fn want(&mut self, key: ShellKey) {
        self.wanted.retain(|k| *k != key);
        self.wanted.insert(0, key);
        self.wanted.truncate(MAX_KEYS);
    }

    /// The key to make a shell for next, if any.
    fn next_job(&self, capacity: usize) -> Option<ShellKey> {
        if self.held {
            return None;
        }
        let key = *self.wanted.first()?;
        (self.count(&key) < capacity).then_some(key)
    }

    /// Remove one shell of another key than `keep` (the least wanted first).
    fn evict_other(&mut self, keep: ShellKey) -> Option<Shell> {
        let victim = self
            .shells
            .iter()
            .filter(|(k, v)| **k != keep && !v.is_empty())
            .max_by_key(|(k, _)| {
                self.wanted
                    .iter()
                    .position(|w| w == *k)
                    .unwrap_or(usize::MAX)
            })
            .map(|(k, _)| *k)?;
        self.shells.get_mut(&victim)?.pop()
    }
}

struct Inner {
    capacity: usize,
    store: Mutex<Store>,
    /// Signalled on a take (work for the refill thread), a new shell, and stop.
    cond: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
    created: AtomicU64,
    failed: AtomicU64,
    evicted: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self) {
        let mut retry = RETRY_AFTER;
        let mut store = self.lock();
        loop {
            if store.stop {
                return;
            }
            let Some(key) = store.next_job(self.capacity) else {
                store = self.cond.wait(store).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let quiet = store.last_take.map_or(Duration::ZERO, |t| {
                QUIET_AFTER_TAKE.saturating_sub(t.elapsed())
            });
            if !quiet.is_zero() {
                store = self
                    .cond
                    .wait_timeout(store, quiet)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let evicted = if store.total() >= self.capacity {
                match store.evict_other(key) {
                    Some(s) => Some(s),
                    // Full of this key's shells (cannot happen: the job says it has fewer).
                    None => {
                        store = self.cond.wait(store).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                }
            } else {
                None
            };
            drop(store);
            if evicted.is_some() {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            drop(evicted);
            let made = Shell::create(key).and_then(|(mut s, t)| {
                s.start_threads()?;
                Ok((s, t))
            });
            store = self.lock();
            match made {
                Ok((shell, _)) => {
                    retry = RETRY_AFTER;
                    self.created.fetch_add(1, Ordering::Relaxed);
                    let fits =
                        !store.stop && store.wanted.contains(&key) && store.total() < self.capacity;
                    if fits {
                        store.shells.entry(key).or_default().push(shell);
                        self.cond.notify_all();
                    } else {
                        drop(store);
                        drop(shell);
                        store = self.lock();
                    }
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("VM pool: {e}; retrying in {retry:?}");
                    store.last_error = Some(e.to_string());
                    store = self
                        .cond
                        .wait_timeout(store, retry)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// A bounded pool of [`Shell`]s with a refill thread (see the module docs). Share it as an
/// `Arc` (e.g. in [`crate::CloneOptions::pool`]); dropping the last one stops the thread and
/// closes the shells.
pub struct ShellPool {
    inner: Arc<Inner>,
    refill: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShellPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellPool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl ShellPool {
    /// A pool keeping at most `capacity` shells (0: no shells and no thread; every take is a
    /// miss).
    pub fn new(capacity: usize) -> Result<ShellPool, PoolError> {
        let inner = Arc::new(Inner {
            capacity,
            store: Mutex::new(Store::default()),
            cond: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            created: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        });
        let refill = if capacity > 0 {
            let worker = inner.clone();
            let h = std::thread::Builder::new()
                .name("kscope-vm-pool".into())
                .spawn(move || worker.refill())
                .map_err(|e| PoolError::Thread(e.to_string()))?;
            Some(h)
        } else {
            None
        };
        Ok(ShellPool { inner, refill })
    }

    /// Most shells kept.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Make `key` the wanted key: the refill thread fills the pool with shells for it
    /// (dropping shells of other keys to stay within the capacity).
    pub fn prepare(&self, key: ShellKey) {
        if self.inner.capacity == 0 {
            return;
        }
        let mut s = self.inner.lock();
        s.want(key);
        self.inner.cond.notify_all();
    }

    /// Take a shell for `key` without waiting (`None`: a miss, counted; create one directly).
    /// The key becomes the wanted one and the refill thread is woken.
    pub fn take(&self, key: ShellKey) -> Option<Shell> {
        let shell = if self.inner.capacity == 0 {
            None
        } else {
            let mut s = self.inner.lock();
            s.want(key);
            s.last_take = Some(Instant::now());
            let shell = s.shells.get_mut(&key).and_then(Vec::pop);
            self.inner.cond.notify_all();
            shell
        };
        let counter = match shell {
            Some(_) => &self.inner.hits,
            None => &self.inner.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        shell
    }

    /// Wait until `key` has `n` shells ready (at most the capacity), or `timeout` passes.
    /// Returns the number ready. For benchmarks and tests; clone calls never wait.
    pub fn wait_ready(&self, key: ShellKey, n: usize, timeout: Duration) -> usize {
        let n = n.min(self.inner.capacity);
        let deadline = Instant::now() + timeout;
        let mut s = self.inner.lock();
        loop {
            let ready = s.count(&key);
            let now = Instant::now();
            if ready >= n || now >= deadline || s.stop {
                return ready;
            }
            s = self
                .inner
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Hold (`true`) or restart (`false`) refilling: while held, takes empty the pool and the
    /// refill thread makes nothing (e.g. under host memory pressure, or to measure the
    /// direct path).
    pub fn hold_refill(&self, held: bool) {
        let mut s = self.inner.lock();
        s.held = held;
        self.inner.cond.notify_all();
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        let ready = self.inner.lock().total();
        PoolStats {
            capacity: self.inner.capacity,
            ready,
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            created: self.inner.created.load(Ordering::Relaxed),
            failed: self.inner.failed.load(Ordering::Relaxed),
            evicted: self.inner.evicted.load(Ordering::Relaxed),
        }
    }

    /// The refill thread's last error, if a shell could not be made.
    pub fn last_error(&self) -> Option<String> {
        self.inner.lock().last_error.clone()
    }
}

impl Drop for ShellPool {
    fn drop(&mut self) {
        let shells = {
            let mut s = self.inner.lock();
            s.stop = true;
            self.inner.cond.notify_all();
            std::mem::take(&mut s.shells)
        };
        if let Some(h) = self.refill.take() {
            if h.join().is_err() {
                tracing::error!("VM pool: the refill thread panicked");
            }
        }
        drop(shells);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(mib: u64) -> ShellKey {
        ShellKey {
            mem_bytes: mib << 20,
            vcpus: 1,
        }
    }

    #[test]
    fn store_wants_most_recent_first_and_bounds_keys() {
        let mut s = Store::default();
        for m in 1..=6 {
            s.want(key(m));
        }
        s.want(key(3));
        assert_eq!(s.wanted.len(), MAX_KEYS);
        assert_eq!(s.wanted[0], key(3));
        assert_eq!(s.wanted[1], key(6));
        assert_eq!(s.next_job(2), Some(key(3)));
        assert_eq!(s.next_job(0), None);
    }

    #[test]
    fn empty_store_evicts_nothing_and_a_held_one_asks_for_nothing() {
        let mut s = Store::default();
        s.want(key(1));
        s.want(key(2));
        s.want(key(3));
        // No shells at all: nothing to evict.
        assert!(s.evict_other(key(3)).is_none());
        assert_eq!(s.total(), 0);
        assert_eq!(s.count(&key(1)), 0);
        s.held = true;
        assert_eq!(s.next_job(4), None, "held: no refill");
    }

    #[test]
    fn empty_pool_counts_misses_and_never_waits() {
        let pool = ShellPool::new(0).unwrap();
        let t = Instant::now();
        assert!(pool.take(key(64)).is_none());
        assert!(pool.take(key(64)).is_none());
        assert!(t.elapsed() < Duration::from_millis(100));
        let st = pool.stats();
        assert_eq!((st.hits, st.misses, st.ready, st.capacity), (0, 2, 0, 0));
    }
}
