//! Creating one VM from a generation image: a clone (new GenPage identity) or a restored VM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::as_bytes;
use kscope_guest::abi::boot::{GenPage, Identity, GENPAGE_MAGIC};
use kscope_guest::abi::layout::GENPAGE_GPA;

use super::{CloneContext, Generation, MemoryMode, PrefetcherFactory};
use crate::config::VmConfig;
use crate::error::VmError;
use crate::hostmem::PAGE_SIZE;
use crate::hypervisor;
use crate::lazy::{eager_fill, FaultServer, LazyRegion, RegionKind, ServerOptions};
use crate::memory::{GuestMemory, GuestRam, Keeper};
use crate::mode::CpuMode;
use crate::pool::{Shell, ShellKey, ShellPool};
use crate::prefetch::{OnDemand, Prefetcher};
use crate::state;
use crate::vm::{Assembly, BootReport, Vm};

/// Generation numbers written into clones' GenPages (0 = a booted VM).
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
/// Clone ids (process-unique).
static NEXT_CLONE_ID: AtomicU64 = AtomicU64::new(1);

/// What to create.
pub(crate) struct ChildSpec {
    pub name: String,
    pub index: usize,
    pub memory: MemoryMode,
    pub prefetcher: Option<PrefetcherFactory>,
    pub start_paused: bool,
    pub fault_spin: Duration,
    /// Lazy memory is anonymous private memory instead of a memfd.
    pub anon_memory: bool,
    /// Write a new GenPage (a clone); false for a restored VM.
    pub identity: bool,
    /// Where a lazy memfd child takes its shell from (none: it makes its own).
    pub pool: Option<Arc<ShellPool>>,
}

/// 32 bytes from the kernel's CSPRNG.
fn random_seed() -> Result<[u8; 32], VmError> {
    let mut b = [0u8; 32];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: writes at most `b.len() - got` bytes into the rest of `b`.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmError::Internal(format!("getrandom: {e}")));
        }
        got += n as usize;
    }
    Ok(b)
}

/// The identity of clone `id`: MAC 52:54:00:xx:xx:xx, IPv4 10.0.x.y/16, host name `name`.
pub fn identity_for(id: u64, name: &str) -> Identity {
    let mut mac = [0u8; 8];
    mac[..6].copy_from_slice(&[
        0x52,
        0x54,
        0x00,
        (id >> 16) as u8,
        (id >> 8) as u8,
        id as u8,
    ]);
    let host = id % (254 * 256);
    let ipv4 = [10, 0, (host / 254) as u8, (host % 254) as u8 + 1];
    let mut hostname = [0u8; 32];
    let n = name.len().min(31);
    hostname[..n].copy_from_slice(&name.as_bytes()[..n]);
    Identity {
        mac,
        ipv4,
        prefix_len: 16,
        hostname,
    }
}

/// Where one child's creation time went, phase by phase (the phases of [`spawn`] in order).
/// A child made from a pooled shell spends nothing in `create_vm`, `memory` (lazy),
/// `memory_slot` and `vcpus`: they were paid ahead of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpawnBreakdown {
    /// Whether the child came from a pooled shell.
    pub pooled: bool,
    /// Taking the shell from the pool (or, on a miss, what making it cost beyond the phases
    /// below).
    pub shell: Duration,
    /// `KVM_CREATE_VM`.
    pub create_vm: Duration,
    /// The GenPage's identity and seed, the network attachment.
    pub identity: Duration,
    /// Destination memory: memfd, mapping, userfaultfd registration (lazy), or the whole copy
    /// (eager).
    pub memory: Duration,
    /// The fault server: policy, handler thread, pre-resume list, the GenPage install.
    pub fault_server: Duration,
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub memory_slot: Duration,
    /// `KVM_CREATE_VCPU` and CPUID.
    pub vcpus: Duration,
    /// The clock and the saved vCPU state.
    pub vcpu_state: Duration,
    /// Devices, their state, the VM's bookkeeping and the vCPU threads.
    pub assemble: Duration,
}

impl SpawnBreakdown {
    /// The phases with their names, in order.
    pub fn phases(&self) -> [(&'static str, Duration); 9] {
        [
            ("shell", self.shell),
            ("create_vm", self.create_vm),
            ("identity", self.identity),
            ("memory", self.memory),
            ("fault_server", self.fault_server),
            ("memory_slot", self.memory_slot),
            ("vcpus", self.vcpus),
            ("vcpu_state", self.vcpu_state),
            ("assemble", self.assemble),
        ]
    }
}

/// Create a VM from `gen` per `spec`.
pub(crate) fn spawn(gen: &Arc<Generation>, spec: &ChildSpec) -> Result<Vm, VmError> {
    spawn_timed(gen, spec).map(|(vm, _)| vm)
}

/// [`spawn`], with where its time went.
pub(crate) fn spawn_timed(
    gen: &Arc<Generation>,
    spec: &ChildSpec,
) -> Result<(Vm, SpawnBreakdown), VmError> {
    let start = Instant::now();
    let mut t = SpawnBreakdown::default();
    let mut lap = Instant::now();
    let mut mark = |d: &mut Duration| {
        let now = Instant::now();
        *d = now - lap;
        lap = now;
    };
    let mut cfg = VmConfig {
        name: spec.name.clone(),
        net: None,
        ..gen.cfg.clone()
    };
    let size = cfg.mem_bytes;
    let pages = size / PAGE_SIZE as u64;
    // A lazy child on a memfd starts from a shell (KVM VM, memory slot over an empty
    // userfaultfd region, vCPUs): from the pool when one fits, else made here (a miss).
    let parts = if spec.memory == MemoryMode::Lazy && !spec.anon_memory {
        let key = ShellKey {
            mem_bytes: size,
            vcpus: gen.state.vcpus.len() as u32,
        };
        let taken = spec.pool.as_ref().and_then(|p| p.take(key));
        t.pooled = taken.is_some();
        let shell = match taken {
            Some(s) => s,
            None => {
                let (s, st) = Shell::create(key)?;
                (t.create_vm, t.memory, t.memory_slot, t.vcpus) =
                    (st.create_vm, st.memory, st.memory_slot, st.vcpus);
                s
            }
        };
        Some(shell.into_parts())
    } else {
        None
    };
    let (hv, made_vcpus, made_region, handler_thread, vcpu_threads) = match parts {
        Some(p) => (
            p.hv,
            Some(p.vcpus),
            Some(p.region),
            p.handler_thread,
            p.vcpu_threads,
        ),
        None => (
            hypervisor::host().create_vm()?,
            None,
            None,
            None,
            Vec::new(),
        ),
    };
    mark(&mut t.shell);
    if made_vcpus.is_some() {
        t.shell = t
            .shell
            .saturating_sub(t.create_vm + t.memory + t.memory_slot + t.vcpus);
    } else {
        t.create_vm = std::mem::take(&mut t.shell);
    }
    let genpage = if spec.identity {
        let clone_id = NEXT_CLONE_ID.fetch_add(1, Ordering::Relaxed);
        Some(GenPage {
            magic: GENPAGE_MAGIC,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            clone_id,
            seed: random_seed()?,
            identity: identity_for(clone_id, &spec.name),
        })
    } else {
        None
    };
    // A clone of a VM with a network gets a tap from the pool and its own address (the one
    // in its GenPage, which the guest applies on SIGCLONE); a restored VM gets none.
    if let (Some(parent), Some(g)) = (gen.cfg.net.as_ref(), genpage.as_ref()) {
        cfg.net = Some(
            crate::net::NetAttach::new(parent.network.clone(), &g.identity)
                .map_err(|e| VmError::BadConfig(format!("clone network: {e}")))?,
        );
    }
    mark(&mut t.identity);
    let (ram, lazy) = match spec.memory {
        MemoryMode::Lazy => {
            let kind = match spec.anon_memory {
                true => RegionKind::AnonPrivate,
                false => RegionKind::SharedMemfd,
            };
            let region = match made_region {
                Some(r) => r,
                None => {
                    let r = LazyRegion::new(pages, kind)?;
                    mark(&mut t.memory);
                    r
                }
            };
            let ctx = CloneContext {
                generation: gen.clone(),
                index: spec.index,
                clone_id: genpage.map_or(0, |g| g.clone_id),
            };
            let policy: Box<dyn Prefetcher> = match &spec.prefetcher {
                Some(f) => f(&ctx),
                None => Box::new(OnDemand),
            };
            let mut server = FaultServer::start_on(
                region,
                gen.image.clone(),
                policy,
                ServerOptions {
                    name: spec.name.clone(),
                    spin: spec.fault_spin,
                    ..Default::default()
                },
                handler_thread,
            )?;
            server.before_resume()?;
            if let Some(g) = &genpage {
                // Install the page through the server (counted), then overwrite it.
                server.install(&[GENPAGE_GPA / PAGE_SIZE as u64])?;
                server.region().write_at(GENPAGE_GPA, as_bytes(g))?;
            }
            // Guest RAM shares the region's memfd (one descriptor per clone, not two).
            let fd = server.region().memfd_file();
            let addr = server.region().host_addr() as *mut u8;
            // The policy's background list (FaaSnap's loading set, Kaleidoscope's background
            // colors) is fetched by its own thread while the clone runs; it never blocks a
            // vCPU and races safely with fault handling.
            server.start_background()?;
            let server = Arc::new(server);
            let keep = Keeper(server.clone());
            let ram = match fd {
                // SAFETY: the region is a live MAP_SHARED, writable mapping of its memfd of
                // `size` bytes, owned by `server`, which the keeper keeps alive.
                Some(fd) => unsafe { GuestRam::from_raw(addr, size, fd, keep) },
                // SAFETY: the region is a live anonymous MAP_PRIVATE, writable mapping of
                // `size` bytes, owned by `server`, which the keeper keeps alive.
                None => unsafe { GuestRam::from_raw_anon(addr, size, keep) },
            }?;
            mark(&mut t.fault_server);
            (ram, Some(server))
        }
        MemoryMode::Eager => {
            let ram = GuestRam::new(&spec.name, size)?;
            eager_fill(gen.image.as_ref(), |gpa, page| ram.write(gpa, page))?;
            if let Some(g) = &genpage {
                ram.write(GENPAGE_GPA, as_bytes(g))?;
            }
            mark(&mut t.memory);
            (ram, None)
        }
    };
    let mut vcpus = match made_vcpus {
        // The shell's slot 0 already maps the region that `ram` is a view of.
        Some(v) => v,
        None => {
            // SAFETY: `ram` is kept alive by the VM's `GuestMemory` until after the KVM VM is
            // closed.
            unsafe { hv.set_memory_slot(0, 0, ram.size(), ram.host_addr())? };
            mark(&mut t.memory_slot);
            let v = state::create_vcpus(hv.as_ref(), gen.state.vcpus.len() as u32)?;
            mark(&mut t.vcpus);
            v
        }
    };
    state::restore_into(
        hv.as_ref(),
        &gen.state,
        &mut vcpus,
        &spec.name,
        spec.identity,
    )?;
    mark(&mut t.vcpu_state);
    let vm = Vm::assemble(Assembly {
        cfg,
        hv,
        memory: Arc::new(GuestMemory::new(ram)),
        vcpus,
        devices: Some(&gen.state.devices),
        start,
        ready: Some(BootReport {
            boot_time: Duration::ZERO,
            setup_time: Duration::ZERO,
            ready_value: gen.state.ready_value,
        }),
        start_paused: spec.start_paused,
        lazy,
        origin: spec.identity.then(|| gen.clone()),
        identity: genpage.map(|g| (g.clone_id, g.identity)),
        mode: if gen.state.vcpus.first().is_some_and(|v| v.native()) {
            CpuMode::Native
        } else {
            CpuMode::Emulated
        },
        threads: vcpu_threads,
    })?;
    if let Some(server) = &vm.lazy {
        // A page the image cannot give (a corrupt snapshot page) fails this VM, never the
        // guest's data.
        let core = Arc::downgrade(&vm.core);
        server.on_failure(Box::new(move |e| {
            if let Some(core) = core.upgrade() {
                let err = VmError::from_lazy(&e);
                crate::vcpu::VcpuHost::terminate(
                    core.as_ref(),
                    crate::vcpu::ExitReason::Failed(err),
                );
            }
        }));
    }
    mark(&mut t.assemble);
    Ok((vm, t))
}
