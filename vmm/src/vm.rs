//! The VM: configuration, boot, lifecycle, requests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::boot::{self, BootParams};
use crate::devices::block::BlockDevice;
use crate::devices::bus::Bus;
use crate::devices::net::{NetCounts, NetDevice, TapWatcher};
use crate::devices::request::{
    PendingResponse, RequestDevice, RequestHub, RequestTransport, Response, VirtioRequestTransport,
    Watchdog,
};
use crate::devices::serial::{ConsoleBuffer, SerialDevice};
use crate::devices::virtio_mmio::MmioTransport;
use crate::devices::{DeviceSet, DeviceStates};
use crate::error::VmError;
use crate::generation::{Generation, ParentState};
use crate::hostmem::PAGE_SIZE;
use crate::hypervisor::{self, HvVcpu, HvVm, VcpuState};
use crate::lazy::FaultServer;
use crate::lifecycle::{StateError, VmOp};
use crate::loader;
use crate::memory::{private_pages, GuestMemory, GuestRam, MemoryStats};
use crate::mode::{CpuMode, GuestMode};
use crate::net::NetAttach;
use crate::state::{self, MachineState};
use crate::vcpu::{
    ExitCounters, ExitCounts, ExitReason, VcpuControl, VcpuHost, VcpuMsg, VcpuThread,
};
use crate::worker::{Parked, Worker};
use kscope_guest::abi::boot::{DeviceDesc, DeviceKind, Identity};
use kscope_guest::abi::layout::{ports, MMIO_BASE, MMIO_DEVICE_SIZE};

pub use crate::config::{VmConfig, MAX_VCPUS};
pub use crate::lifecycle::VmState;

/// Bytes of console output kept per VM.
pub const CONSOLE_CAPACITY: usize = 1 << 20;
/// Lines of console included in error reports.
const TAIL_LINES: usize = 20;
/// KVM memory slot of guest RAM.
pub(crate) const RAM_SLOT: u32 = 0;
/// GPA of the block device.
pub const BLOCK_GPA: u64 = MMIO_BASE;
/// GPA of the request device.
pub const REQUEST_GPA: u64 = MMIO_BASE + MMIO_DEVICE_SIZE;
/// GPA of the virtio-net device (VMs with a network).
pub const NET_GPA: u64 = MMIO_BASE + 2 * MMIO_DEVICE_SIZE;

/// Result of a successful boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootReport {
    /// Time from the start of [`Vm::boot`] to the READY port write.
    pub boot_time: Duration,
    /// Time spent in [`Vm::boot`] itself (VM creation and setup until the vCPU was started).
    pub setup_time: Duration,
    /// Value written to READY.
    pub ready_value: u32,
}

/// How a VM ended.
#[derive(Debug, Clone)]
pub struct ExitReport {
    /// Why.
    pub reason: ExitReason,
    /// Time since boot.
    pub uptime: Duration,
    /// Exit counters.
    pub exits: ExitCounts,
}

#[derive(Debug)]
struct Status {
    state: VmState,
    paused_from: VmState,
    ready: Option<BootReport>,
    outcome: Option<ExitReason>,
    ended_at: Option<Instant>,
}

/// State shared by the VM handle, its vCPU threads and pending responses.
pub(crate) struct VmCore {
    name: String,
    status: Mutex<Status>,
    cond: Condvar,
    console: Arc<ConsoleBuffer>,
    pub(crate) controls: Vec<Arc<VcpuControl>>,
    requests: VirtioRequestTransport,
    net: Option<Arc<Mutex<MmioTransport<NetDevice>>>>,
    boot_start: Instant,
    setup_time: Mutex<Duration>,
    counters: Arc<ExitCounters>,
    /// The CPU mode the kernel must run in (asked for at boot; inherited by clones).
    expected_mode: CpuMode,
    /// The mode the kernel last reported (`NO_MODE` before its first report).
    reported_mode: AtomicU32,
}

/// [`VmCore::reported_mode`] before the kernel's first report.
const NO_MODE: u32 = u32::MAX;

impl VmCore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reason_error(reason: &ExitReason) -> VmError {
        match reason {
            ExitReason::Failed(e) => e.clone(),
            ExitReason::PowerOff(c) => VmError::Stopped(format!("guest powered off with code {c}")),
            ExitReason::Stopped => VmError::Stopped("stopped by the host".into()),
        }
    }
}

impl VcpuHost for VmCore {
    fn ready(&self, value: u32) {
        let mut s = self.lock();
        if s.ready.is_none() {
            s.ready = Some(BootReport {
                boot_time: self.boot_start.elapsed(),
                setup_time: *self.setup_time.lock().unwrap_or_else(|p| p.into_inner()),
                ready_value: value,
            });
        }
        match s.state {
            VmState::Booting => s.state = VmState::Running,
            VmState::Paused => s.paused_from = VmState::Running,
            _ => {}
        }
        self.cond.notify_all();
    }

    fn cpu_mode(&self, value: u32) {
        self.reported_mode.store(value, Ordering::Relaxed);
        match CpuMode::from_abi(value) {
            Some(m) if m == self.expected_mode => {
                tracing::debug!(vm = %self.name, "guest kernel runs {m}");
            }
            got => {
                let got = got.map_or_else(|| format!("unknown mode {value}"), |m| m.to_string());
                self.terminate(ExitReason::Failed(VmError::BadConfig(format!(
                    "the guest kernel was to run {} but reports {got}; see its console:\n{}",
                    self.expected_mode,
                    self.console_tail()
                ))));
            }
        }
    }

    fn terminate(&self, reason: ExitReason) {
        let mut s = self.lock();
        if s.outcome.is_some() {
            return;
        }
        s.state = match &reason {
            ExitReason::Failed(e) => {
                tracing::warn!(vm = %self.name, "VM failed: {e}");
                VmState::Failed(e.to_string())
            }
            // Stop is valid in every state that has no outcome yet (the lifecycle table).
            _ => s
                .state
                .transition(VmOp::Stop, &s.paused_from)
                .unwrap_or(VmState::Stopped),
        };
        let err = Self::reason_error(&reason);
        s.outcome = Some(reason);
        s.ended_at = Some(Instant::now());
        self.cond.notify_all();
        drop(s);
        self.requests.close(&err);
        for c in &self.controls {
            c.send_and_kick(VcpuMsg::Stop);
        }
    }

    fn console_tail(&self) -> String {
        self.console.tail(TAIL_LINES)
    }

    fn net_idle(&self) -> (u64, Option<Duration>) {
        let Some(n) = &self.net else { return (0, None) };
        let mut t = n.lock().unwrap_or_else(|p| p.into_inner());
        let stats = t.device().stats();
        let before = stats.rx_frames.load(std::sync::atomic::Ordering::Relaxed);
        // TX first (the guest does not notify for it), then RX.
        t.kick_queue(kscope_guest::abi::net::TX_QUEUE);
        let after = stats.rx_frames.load(std::sync::atomic::Ordering::Relaxed);
        (after - before, t.device().wake_in())
    }

    fn requests(&self) -> &dyn RequestTransport {
        &self.requests
    }
}

impl Watchdog for VmCore {
    fn on_timeout(&self, id: u64, timeout: Duration) -> VmError {
        if let Some(r) = &self.lock().outcome {
            return Self::reason_error(r);
        }
        let (tx, rx) = mpsc::channel();
        let rip = match self.controls.first() {
            Some(c) if c.send_and_kick(VcpuMsg::Sample(tx)) => {
                rx.recv_timeout(Duration::from_secs(1)).unwrap_or(0)
            }
            _ => 0,
        };
        let err = VmError::Unresponsive { id, timeout, rip };
        self.terminate(ExitReason::Failed(err.clone()));
        // If something else ended the VM first, report that.
        match &self.lock().outcome {
            Some(ExitReason::Failed(e)) => e.clone(),
            Some(r) => Self::reason_error(r),
            None => err,
        }
    }
}

/// What [`Vm::assemble`] needs.
pub(crate) struct Assembly<'a> {
    pub(crate) cfg: VmConfig,
    pub(crate) hv: Box<dyn HvVm>,
    pub(crate) memory: Arc<GuestMemory>,
    /// vCPUs with CPUID and registers set.
    pub(crate) vcpus: Vec<Box<dyn HvVcpu>>,
    /// Device state to restore (`None`: fresh devices).
    pub(crate) devices: Option<&'a DeviceStates>,
    pub(crate) start: Instant,
    /// `Some` for a VM resumed from a captured state (already READY).
    pub(crate) ready: Option<BootReport>,
    pub(crate) start_paused: bool,
    pub(crate) lazy: Option<Arc<FaultServer>>,
    pub(crate) origin: Option<Arc<Generation>>,
    /// A clone's id and identity (as written into its GenPage).
    pub(crate) identity: Option<(u64, Identity)>,
    /// The CPU mode the kernel must report (booted: the resolved request; restored or
    /// cloned: the mode of the saved vCPU state).
    pub(crate) mode: CpuMode,
    /// Threads started ahead of time for the vCPUs (as many as given are used; the others
    /// are started here).
    pub(crate) threads: Vec<Parked>,
}

/// A running VM. `Send + Sync`; dropping it stops the VM.
pub struct Vm {
    // Field order matters for drop: threads are joined in `Drop`, then the KVM VM is closed,
    // then guest RAM is unmapped (and a clone's fault server stopped).
    pub(crate) core: Arc<VmCore>,
    threads: Mutex<Vec<Worker<()>>>,
    /// The KVM VM. Replaced once, at the first freeze ([`crate::clone`]'s re-home).
    pub(crate) hv: Mutex<Box<dyn HvVm>>,
    pub(crate) memory: Arc<GuestMemory>,
    mem_bytes: u64,
    pub(crate) devices: DeviceSet,
    pub(crate) cfg: VmConfig,
    /// The fault server of a lazily served clone or restored VM.
    pub(crate) lazy: Option<Arc<FaultServer>>,
    /// The generation image this VM was cloned from.
    pub(crate) origin: Option<Arc<Generation>>,
    /// Clone id and identity written into the GenPage (clones only).
    pub(crate) identity: Option<(u64, Identity)>,
    /// Time of the first `KVM_RUN`.
    pub(crate) first_run: Arc<OnceLock<Instant>>,
    /// Frozen images of this VM as a parent.
    pub(crate) parent: Mutex<ParentState>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.core.name)
            .field("mem_bytes", &self.mem_bytes)
            .field("state", &self.state())
            .finish()
    }
}

impl Vm {
    /// Create a VM, load the kernel, set up boot state and devices, and start vCPU 0.
    pub fn boot(cfg: VmConfig) -> Result<Vm, VmError> {
        let start = Instant::now();
        cfg.validate()?;
        let hv = hypervisor::host().create_vm()?;
        let ram = GuestRam::new(&cfg.name, cfg.mem_bytes)?;
        let kernel = loader::load_kernel(&ram, &cfg.kernel)?;
        // SAFETY: the mapping belongs to `ram`, which `memory` keeps alive in the `Vm`; the
        // slot is removed or re-pointed before a mapping is dropped (`swap_memory`), and the
        // `Vm` drops the KVM VM before guest RAM.
        unsafe { hv.set_memory_slot(RAM_SLOT, 0, ram.size(), ram.host_addr())? };
        let memory = Arc::new(GuestMemory::new(ram));
        let mut devices = vec![
            DeviceDesc {
                kind: DeviceKind::Block as u32,
                irq: 0,
                gpa: BLOCK_GPA,
                size: MMIO_DEVICE_SIZE,
            },
            DeviceDesc {
                kind: DeviceKind::Request as u32,
                irq: 0,
                gpa: REQUEST_GPA,
                size: MMIO_DEVICE_SIZE,
            },
        ];
        if cfg.net.is_some() {
            devices.push(DeviceDesc {
                kind: DeviceKind::Net as u32,
                irq: 0,
                gpa: NET_GPA,
                size: MMIO_DEVICE_SIZE,
            });
        }
        let mut vcpus: Vec<Box<dyn HvVcpu>> = (0..cfg.vcpus)
            .map(|i| hv.create_vcpu(i))
            .collect::<Result<_, _>>()?;
        let native_available = vcpus[0].native_available();
        let mode = cfg.guest_mode.resolve(native_available)?;
        if cfg.guest_mode == GuestMode::Auto && !native_available {
            tracing::warn!(
                vm = %cfg.name,
                "this host has no PVM native switch: the guest kernel runs in KVM's instruction \
                 emulator (slow); pass --guest-mode emulated to silence this"
            );
        }
        let tsc_khz = vcpus[0].tsc_khz()?;
        let cpu = boot::setup(
            &memory.load(),
            &BootParams {
                vcpus: cfg.vcpus,
                entry: kernel.entry,
                kernel_phys_end: kernel.phys_end,
                tsc_khz,
                devices: &devices,
                cmdline: &cfg.cmdline,
                mode,
            },
        )?;
        for v in &mut vcpus {
            v.configure(&cpu, cfg.vcpus)?;
        }
        Vm::assemble(Assembly {
            cfg,
            hv,
            memory,
            vcpus,
            devices: None,
            start,
            ready: None,
            start_paused: false,
            lazy: None,
            origin: None,
            identity: None,
            mode,
            threads: Vec::new(),
        })
    }

    /// Build devices, the shared core and the vCPU threads of a VM whose memory slot and vCPU
    /// state are set up; start vCPU 0 (unless `start_paused`).
    pub(crate) fn assemble(a: Assembly<'_>) -> Result<Vm, VmError> {
        let Assembly {
            cfg,
            hv,
            memory,
            vcpus,
            devices: saved,
            start,
            ready,
            start_paused,
            lazy,
            origin,
            identity,
            mode,
            threads: parked,
        } = a;
        let echo = std::env::var("KSCOPE_SERIAL").is_ok_and(|v| v == "stderr");
        let console = Arc::new(ConsoleBuffer::new(CONSOLE_CAPACITY, echo));
        let serial = match saved {
            Some(st) => {
                SerialDevice::from_state(&st.serial, console.clone()).map_err(VmError::BadConfig)?
            }
            None => SerialDevice::new(console.clone()),
        };
        let serial = Arc::new(Mutex::new(serial));
        let mut io = Bus::new();
        io.insert(u64::from(ports::SERIAL_COM1), 8, serial.clone())?;
        let hub = RequestHub::new();
        let mut block_t = MmioTransport::new(
            BlockDevice::new(cfg.disk.clone(), &format!("kscope-{}", cfg.name)),
            memory.clone(),
        );
        let mut request_t = MmioTransport::new(RequestDevice::new(hub.clone()), memory.clone());
        if let Some(st) = saved {
            block_t
                .restore_state(&st.block)
                .map_err(|e| VmError::BadConfig(format!("block device: {e}")))?;
            request_t
                .restore_state(&st.request)
                .map_err(|e| VmError::BadConfig(format!("request device: {e}")))?;
        }
        let block = Arc::new(Mutex::new(block_t));
        let request = Arc::new(Mutex::new(request_t));
        let mut mmio = Bus::new();
        mmio.insert(BLOCK_GPA, MMIO_DEVICE_SIZE, block.clone())?;
        mmio.insert(REQUEST_GPA, MMIO_DEVICE_SIZE, request.clone())?;
        // A network device when configured, and in a VM restored from one that had it (then
        // disconnected if no tap was given, so that the guest's driver keeps working).
        let saved_net = saved.and_then(|s| s.net.as_ref());
        let net = if cfg.net.is_some() || saved_net.is_some() {
            let mut t = MmioTransport::new(NetDevice::new(cfg.net.as_ref()), memory.clone());
            if let Some(st) = saved_net {
                t.restore_state(st)
                    .map_err(|e| VmError::BadConfig(format!("net device: {e}")))?;
            }
            let t = Arc::new(Mutex::new(t));
            mmio.insert(NET_GPA, MMIO_DEVICE_SIZE, t.clone())?;
            Some(t)
        } else {
            None
        };

        let n = vcpus.len();
        let mut controls = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::channel();
            controls.push(Arc::new(VcpuControl::new(tx)));
            receivers.push(rx);
        }
        let (state, paused_from) = match (ready.is_some(), start_paused) {
            (false, _) => (VmState::Booting, VmState::Booting),
            (true, false) => (VmState::Running, VmState::Running),
            (true, true) => (VmState::Paused, VmState::Running),
        };
        let core = Arc::new(VmCore {
            name: cfg.name.clone(),
            status: Mutex::new(Status {
                state,
                paused_from,
                ready,
                outcome: None,
                ended_at: None,
            }),
            cond: Condvar::new(),
            console,
            controls,
            requests: VirtioRequestTransport::new(hub, request.clone()),
            net: net.clone(),
            boot_start: start,
            setup_time: Mutex::new(Duration::ZERO),
            counters: Arc::new(ExitCounters::default()),
            expected_mode: mode,
            reported_mode: AtomicU32::new(NO_MODE),
        });
        let waker_target = Arc::downgrade(&core);
        core.requests.set_waker(Box::new(move || {
            if let Some(core) = waker_target.upgrade() {
                if let Some(c) = core.controls.first() {
                    c.send(VcpuMsg::Wake);
                }
            }
        }));

        let tap_watcher = match cfg.net.as_ref() {
            Some(a) if net.is_some() => {
                let target = Arc::downgrade(&core);
                let w = TapWatcher::start(
                    a.tap.clone(),
                    Box::new(move || {
                        if let Some(core) = target.upgrade() {
                            if let Some(c) = core.controls.first() {
                                c.send(VcpuMsg::Wake);
                            }
                        }
                    }),
                )
                .map_err(|e| VmError::Internal(format!("cannot watch the tap: {e}")))?;
                Some(w)
            }
            _ => None,
        };

        let first_run = Arc::new(OnceLock::new());
        let mut threads = Vec::new();
        let mut parked = parked.into_iter();
        for (i, (vcpu, rx)) in vcpus.into_iter().zip(receivers).enumerate() {
            let t = VcpuThread {
                id: i as u32,
                vcpu,
                rx,
                control: core.controls[i].clone(),
                io: io.clone(),
                mmio: mmio.clone(),
                host: core.clone() as Arc<dyn VcpuHost>,
                counters: core.counters.clone(),
                backoff: crate::vcpu::NO_BUFFER_BACKOFF,
                first_run: first_run.clone(),
                start_paused: start_paused && i == 0,
                poll_next: false,
            };
            let h = Worker::start(&format!("vcpu{i}-{}", cfg.name), parked.next(), move || {
                t.run()
            })
            .map_err(|e| VmError::Internal(format!("cannot spawn a vCPU thread: {e}")))?;
            threads.push(h);
        }
        let mem_bytes = cfg.mem_bytes;
        let vm = Vm {
            core,
            threads: Mutex::new(threads),
            hv: Mutex::new(hv),
            memory,
            mem_bytes,
            devices: DeviceSet {
                serial,
                block,
                request,
                net,
                _tap_watcher: tap_watcher,
            },
            cfg,
            lazy,
            origin,
            identity,
            first_run,
            parent: Mutex::new(ParentState::default()),
        };
        *vm.core.setup_time.lock().unwrap_or_else(|p| p.into_inner()) = start.elapsed();
        if !start_paused {
            vm.core.controls[0].send(VcpuMsg::Run);
        }
        Ok(vm)
    }

    /// The CPU mode the guest kernel last reported it runs in (`None` before its first
    /// report: at boot it reports before READY; a clone reports when it first sees its new
    /// generation, before it answers anything).
    pub fn cpu_mode(&self) -> Option<CpuMode> {
        CpuMode::from_abi(self.core.reported_mode.load(Ordering::Relaxed))
    }

    /// The CPU mode this VM's kernel must run in.
    pub fn expected_cpu_mode(&self) -> CpuMode {
        self.core.expected_mode
    }

    /// Wait until the guest writes the READY port.
    pub fn wait_ready(&self, timeout: Duration) -> Result<BootReport, VmError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.core.lock();
        loop {
            if let Some(r) = s.ready {
                return Ok(r);
            }
            if let Some(r) = &s.outcome {
                return Err(VmCore::reason_error(r));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::BootTimeout {
                    timeout,
                    serial_tail: self.core.console_tail(),
                });
            }
            s = self
                .core
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Send a request and wait for its response. No response within `timeout` fails the VM
    /// ([`VmError::Unresponsive`]).
    pub fn request(
        &self,
        kind: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Response, VmError> {
        self.submit(kind, payload)?.wait(timeout)
    }

    /// Queue a request; the guest gets it at its next `hlt` or queue notification.
    pub fn submit(&self, kind: u32, payload: &[u8]) -> Result<PendingResponse, VmError> {
        let slot = self.core.requests.submit(kind, payload)?;
        Ok(PendingResponse::new(
            slot,
            self.core.clone() as Arc<dyn Watchdog>,
        ))
    }

    /// Take every vCPU out of the guest and keep it out until [`Vm::resume`].
    pub fn pause(&self) -> Result<(), VmError> {
        self.pause_with(VcpuMsg::Pause).map(|_| ())
    }

    /// [`Vm::pause`], each vCPU saving its state as it acknowledges (a freeze); with `poll`,
    /// the vCPU threads then wait for their next messages polling (see
    /// [`VcpuMsg::PauseAndSave`]).
    pub(crate) fn pause_and_save(&self, poll: bool) -> Result<Vec<VcpuState>, VmError> {
        self.pause_with(|ack| VcpuMsg::PauseAndSave { ack, poll })?
            .into_iter()
            .collect()
    }

    fn pause_with<T: Send + 'static>(
        &self,
        msg: impl Fn(mpsc::Sender<T>) -> VcpuMsg,
    ) -> Result<Vec<T>, VmError> {
        let mut s = self.core.lock();
        let next = s.state.transition(VmOp::Pause, &s.paused_from)?;
        let acks: Vec<_> = self
            .core
            .controls
            .iter()
            .map(|c| {
                let (tx, rx) = mpsc::channel();
                c.send_and_kick(msg(tx));
                rx
            })
            .collect();
        s.paused_from = std::mem::replace(&mut s.state, next);
        drop(s);
        let mut out = Vec::with_capacity(acks.len());
        for rx in acks {
            match crate::vcpu::recv_soon(&rx, Some(Duration::from_secs(10))) {
                Ok(v) => out.push(v),
                Err(_) => {
                    let s = self.core.lock();
                    return match &s.outcome {
                        Some(r) => Err(VmCore::reason_error(r)),
                        None => Err(VmError::Internal("a vCPU did not acknowledge pause".into())),
                    };
                }
            }
        }
        Ok(out)
    }

    /// Resume a paused VM.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut s = self.core.lock();
        s.state = s.state.transition(VmOp::Resume, &s.paused_from)?;
        drop(s);
        for c in &self.core.controls {
            c.send(VcpuMsg::Resume);
        }
        Ok(())
    }

    /// Stop the VM (if still running), join its vCPU threads and report how it ended.
    pub fn stop(&self) -> Result<ExitReport, VmError> {
        self.core.terminate(ExitReason::Stopped);
        let threads: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            if t.join().is_err() {
                tracing::error!(vm = %self.core.name, "a vCPU thread panicked");
            }
        }
        let s = self.core.lock();
        let reason = s.outcome.clone().unwrap_or(ExitReason::Stopped);
        let end = s.ended_at.unwrap_or_else(Instant::now);
        Ok(ExitReport {
            reason,
            uptime: end.duration_since(self.core.boot_start),
            exits: self.core.counters.snapshot(),
        })
    }

    /// The boot report (for a clone or restored VM: the parent's READY value, zero times).
    pub fn boot_report(&self) -> Option<BootReport> {
        self.core.lock().ready
    }

    /// The VM's configuration (kernel, command line, disk, memory size).
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The VM's state.
    pub fn state(&self) -> VmState {
        self.core.lock().state.clone()
    }

    /// The captured serial console (the last [`CONSOLE_CAPACITY`] bytes).
    pub fn serial_output(&self) -> String {
        self.core.console.contents()
    }

    /// Read guest-physical memory.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.memory.load().read(gpa, buf)
    }

    /// Write guest-physical memory (for tests and tools; the guest sees the write at once).
    pub fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.memory.load().write(gpa, data)
    }

    /// Guest RAM size.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The VM's IPv4 address, if it has a network.
    pub fn net_address(&self) -> Option<std::net::Ipv4Addr> {
        self.cfg.net.as_ref().map(|n| n.ip)
    }

    /// The VM's network attachment, if any.
    pub fn net_attach(&self) -> Option<&NetAttach> {
        self.cfg.net.as_ref()
    }

    /// Counters of the VM's network device.
    pub fn net_counts(&self) -> Option<NetCounts> {
        self.devices.net.as_ref().map(|n| {
            n.lock()
                .unwrap_or_else(|p| p.into_inner())
                .device()
                .stats()
                .snapshot()
        })
    }

    /// Exit counters so far.
    pub fn exit_counts(&self) -> ExitCounts {
        self.core.counters.snapshot()
    }

    /// Requests (delivered to the guest, completed by the guest) so far.
    pub fn request_counts(&self) -> (u64, u64) {
        self.core.requests.hub().counters()
    }

    /// The guest RAM handle (current mapping, memfd), e.g. for cloning.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Replace guest RAM by `ram` (same size) while the VM is paused: the KVM slot is
    /// deleted and re-added at the new mapping. Returns the previous RAM.
    pub fn swap_memory(&self, ram: GuestRam) -> Result<Arc<GuestRam>, VmError> {
        self.check_op(VmOp::SwapMemory)?;
        if ram.size() != self.mem_bytes {
            return Err(VmError::BadConfig(format!(
                "replacement RAM is {:#x} bytes, the VM has {:#x}",
                ram.size(),
                self.mem_bytes
            )));
        }
        let ram = Arc::new(ram);
        let hv = self.hv();
        hv.remove_memory_slot(RAM_SLOT, 0)?;
        // SAFETY: `ram` is kept alive by `self.memory` (replaced below) for as long as the
        // slot points at it; the old mapping is released only after the slot moved away.
        unsafe { hv.set_memory_slot(RAM_SLOT, 0, ram.size(), ram.host_addr())? };
        Ok(self.memory.replace(ram))
    }

    /// Save the state of every vCPU (VM paused).
    pub fn save_vcpu_states(&self) -> Result<Vec<VcpuState>, VmError> {
        self.check_op(VmOp::SaveState)?;
        state::save_vcpus(&self.core.controls)
    }

    /// Restore the state of every vCPU (VM paused; one state per vCPU).
    pub fn restore_vcpu_states(&self, states: &[VcpuState]) -> Result<(), VmError> {
        self.check_op(VmOp::SaveState)?;
        state::load_vcpus(&self.core.controls, states)
    }

    /// Capture the device state (VM paused).
    pub fn save_device_states(&self) -> Result<DeviceStates, VmError> {
        self.check_op(VmOp::SaveState)?;
        Ok(self.devices.save_states())
    }

    /// Capture the whole machine state (VM paused), see [`crate::state`].
    pub fn save_machine_state(&self) -> Result<MachineState, VmError> {
        self.check_op(VmOp::SaveState)?;
        self.capture_state(None)
    }

    /// The machine state of a paused VM, with its vCPUs' states if already saved (by
    /// [`Vm::pause_and_save`]).
    pub(crate) fn capture_state(
        &self,
        vcpus: Option<Vec<VcpuState>>,
    ) -> Result<MachineState, VmError> {
        let ready_value = self.boot_report().map_or(0, |r| r.ready_value);
        state::capture(
            &self.core.controls,
            &self.devices,
            self.hv().as_ref(),
            ready_value,
            vcpus,
        )
    }

    /// The KVM VM (locked: a first freeze may replace it).
    pub(crate) fn hv(&self) -> std::sync::MutexGuard<'_, Box<dyn HvVm>> {
        self.hv.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail with a [`StateError`] unless `op` is valid in the VM's current state (the table in
    /// [`crate::lifecycle`]).
    pub(crate) fn check_op(&self, op: VmOp) -> Result<(), StateError> {
        let s = self.core.lock();
        s.state.transition(op, &s.paused_from).map(|_| ())
    }

    /// Memory counters: fault service for lazy VMs, footprint for all.
    pub fn memory_stats(&self) -> MemoryStats {
        let footprint = self.footprint().unwrap_or(0);
        match &self.lazy {
            Some(server) => MemoryStats::of_lazy(server.stats(), footprint),
            None => MemoryStats {
                footprint_bytes: footprint,
                ..Default::default()
            },
        }
    }

    /// Bytes of host memory owned by this VM alone (see [`MemoryStats::footprint_bytes`]).
    fn footprint(&self) -> Result<u64, VmError> {
        if let Some(s) = &self.lazy {
            let frozen = self
                .parent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .base
                .is_some();
            if !frozen {
                return Ok(s.region().resident_bytes()?);
            }
        }
        let ram = self.memory.load();
        if ram.is_private() {
            let pages = ram.size() / PAGE_SIZE as u64;
            return Ok(private_pages(ram.host_addr() as u64, pages)?.count() * PAGE_SIZE as u64);
        }
        let file = ram.file().ok_or_else(|| {
            VmError::Internal("anonymous guest RAM outside a lazily served clone".into())
        })?;
        let m = file
            .metadata()
            .map_err(|e| VmError::Memory(format!("fstat memfd: {e}")))?;
        Ok(std::os::unix::fs::MetadataExt::blocks(&m) * 512)
    }

    /// The generation image this VM was cloned from (`None` for a booted or restored VM).
    pub fn generation(&self) -> Option<Arc<Generation>> {
        self.origin.clone()
    }

    /// The clone id written into this VM's GenPage (`None` if it is not a clone).
    pub fn clone_id(&self) -> Option<u64> {
        self.identity.map(|(id, _)| id)
    }

    /// The identity (MAC, IPv4, host name) written into this clone's GenPage, which its guest
    /// applies (`None` if it is not a clone).
    pub fn identity(&self) -> Option<Identity> {
        self.identity.map(|(_, i)| i)
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

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
