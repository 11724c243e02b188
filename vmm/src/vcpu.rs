//! The vCPU thread: a small state machine driven by [`VcpuMsg`] messages.
//!
//! ```text
//!            Run                Pause              Resume
//!  Parked ---------> Running <---------> Paused ----------> (previous state)
//!    |                 |  hlt: deliver requests or wait for a message
//!    +--- Stop / terminal exit ---> Done
//! ```
//!
//! A thread outside the guest reads its channel; a thread inside `KVM_RUN` is kicked out with
//! the kick signal (see `hypervisor::kvm`) after a message was queued. Application processors
//! stay `Parked` (never entered) until something sends them `Run`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::devices::bus::Bus;
use crate::devices::request::RequestTransport;
use crate::error::VmError;
use crate::exit::{dispatch, Action, Fault};
use crate::hypervisor::{Exit, HvVcpu, VcpuState};
use crate::lifecycle::{StateError, VmOp, VmState};

/// Messages to a vCPU thread.
#[derive(Debug)]
pub enum VcpuMsg {
    /// Start running the guest (from `Parked`).
    Run,
    /// Leave the guest and acknowledge once out of it.
    Pause(Sender<()>),
    /// [`VcpuMsg::Pause`], acknowledged with the vCPU's saved state (a freeze: one round trip
    /// to the vCPU thread instead of two). With `poll`, the thread waits for its next message
    /// polling ([`recv_soon`]): the swap and resume of a first freeze follow within a fraction
    /// of a millisecond, and a send to a polling thread is free. (Not for later freezes: a
    /// thread polling in the process makes their write-protect TLB flushes dearer.)
    PauseAndSave {
        /// Where the saved state goes.
        ack: Sender<Result<VcpuState, VmError>>,
        /// Poll for the next message.
        poll: bool,
    },
    /// Return to the state before `Pause`.
    Resume,
    /// Leave the guest and end the thread.
    Stop,
    /// New work may be pending (a request was queued).
    Wake,
    /// Report the current RIP.
    Sample(Sender<u64>),
    /// Save the vCPU state (only honoured while paused or parked).
    GetState(Sender<Result<VcpuState, VmError>>),
    /// Restore a vCPU state (only honoured while paused or parked).
    SetState(Box<VcpuState>, Sender<Result<(), VmError>>),
    /// Run this vCPU from now on (state already loaded) and hand back the one run so far
    /// (only honoured while paused or parked; otherwise the given vCPU comes back). A parent
    /// moves onto a fresh VM this way at its first freeze (see `clone::rehome`).
    Swap(Box<dyn HvVcpu>, Sender<SwapReply>),
}

/// The answer to [`VcpuMsg::Swap`]: the old vCPU, or the new one back if the thread was running.
pub type SwapReply = Result<Box<dyn HvVcpu>, Box<dyn HvVcpu>>;

/// Why a VM ended.
#[derive(Debug, Clone)]
pub enum ExitReason {
    /// The guest wrote its exit code to the POWEROFF port.
    PowerOff(u32),
    /// The host stopped the VM.
    Stopped,
    /// The VM failed.
    Failed(VmError),
}

/// What the vCPU threads need from their VM.
pub trait VcpuHost: Send + Sync {
    /// The guest reported READY.
    fn ready(&self, value: u32);
    /// The guest kernel reported the CPU mode it runs in (a `cpu_mode` value).
    fn cpu_mode(&self, value: u32);
    /// End the VM (first call wins); stops every vCPU.
    fn terminate(&self, reason: ExitReason);
    /// The last lines of the console.
    fn console_tail(&self) -> String;
    /// The request path.
    fn requests(&self) -> &dyn RequestTransport;
    /// The guest is idle: move frames from the network into it. Returns the frames delivered
    /// and how long the guest may sleep (`None`: until something arrives).
    fn net_idle(&self) -> (u64, Option<Duration>) {
        (0, None)
    }
}

/// Exit counters of a VM (all vCPUs).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Kicks and other interruptions.
    pub interrupted: AtomicU64,
}

/// A snapshot of [`ExitCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Kicks and other interruptions.
    pub interrupted: u64,
}

impl ExitCounters {
    /// Current values.
    pub fn snapshot(&self) -> ExitCounts {
        ExitCounts {
            io: self.io.load(Ordering::Relaxed),
            mmio: self.mmio.load(Ordering::Relaxed),
            hlt: self.hlt.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
        }
    }
}

/// The control side of a vCPU thread: its channel and (while it lives) its pthread.
#[derive(Debug)]
pub struct VcpuControl {
    tx: Mutex<Sender<VcpuMsg>>,
    thread: Mutex<Option<libc::pthread_t>>,
}

impl VcpuControl {
    /// Wrap the sending side of a vCPU's channel.
    pub fn new(tx: Sender<VcpuMsg>) -> VcpuControl {
        VcpuControl {
            tx: Mutex::new(tx),
            thread: Mutex::new(None),
        }
    }

    /// Queue a message without kicking. Returns false if the thread is gone.
    pub fn send(&self, m: VcpuMsg) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(m)
            .is_ok()
    }

    /// Queue a message and kick the thread out of the guest.
    pub fn send_and_kick(&self, m: VcpuMsg) -> bool {
        let ok = self.send(m);
        self.kick();
        ok
    }

    /// Kick the thread out of `KVM_RUN` (no-op if it has exited).
    pub fn kick(&self) {
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *t {
            // SAFETY: `t` is the pthread of a live vCPU thread: it clears this field (under
            // the same lock) before it exits, so the handle is valid while we hold the lock.
            unsafe { libc::pthread_kill(t, crate::hypervisor::kick_signal()) };
        }
    }

    fn set_thread(&self, t: Option<libc::pthread_t>) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Parked,
    Running,
    Paused { was_running: bool },
    Done,
}

impl RunState {
    /// The state a pause leaves: out of the guest, remembering whether it was running.
    fn paused(self) -> RunState {
        match self {
            RunState::Running => RunState::Paused { was_running: true },
            RunState::Parked => RunState::Paused { was_running: false },
            other => other,
        }
    }
}

/// How long a control thread spins for a vCPU thread's reply before it blocks, and a vCPU
/// thread paused while running for the next message (see [`recv_soon`]).
const REPLY_SPIN: Duration = Duration::from_millis(1);

/// Receives a message expected within microseconds to a millisecond (a pause acknowledgement,
/// a swapped vCPU; for a vCPU thread paused while running, the swap and resume of a freeze):
/// polls the channel, yielding the core, for up to [`REPLY_SPIN`] first, then blocks until
/// `timeout` (`None`: for ever). On this host a send to a thread blocked in its receive costs
/// the *sender* 15-500 us (~170 us median to a vCPU thread, measured on `Vm::resume`), which
/// lands inside a freeze's pause and a clone call; a send to a polling receiver costs nothing.
pub(crate) fn recv_soon<T>(
    rx: &Receiver<T>,
    timeout: Option<Duration>,
) -> Result<T, RecvTimeoutError> {
    let start = Instant::now();
    let spin = timeout.map_or(REPLY_SPIN, |t| REPLY_SPIN.min(t));
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                return Err(RecvTimeoutError::Disconnected)
            }
            // Yield, not a bare spin: the thread we wait for may be runnable on this core.
            Err(std::sync::mpsc::TryRecvError::Empty) if start.elapsed() < spin => {
                std::thread::yield_now()
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => break,
        }
    }
    match timeout {
        Some(t) => rx.recv_timeout(t.saturating_sub(start.elapsed())),
        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
    }
}

/// One vCPU and everything its thread needs.
pub struct VcpuThread {
    /// vCPU index (0 = boot processor, which serves the request path).
    pub id: u32,
    /// The vCPU.
    pub vcpu: Box<dyn HvVcpu>,
    /// Receiving side of the control channel.
    pub rx: Receiver<VcpuMsg>,
    /// Control side (to register this thread for kicks).
    pub control: Arc<VcpuControl>,
    /// Port I/O bus.
    pub io: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The VM.
    pub host: Arc<dyn VcpuHost>,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
    /// Current no-buffer back-off (see [`NO_BUFFER_BACKOFF`]).
    pub backoff: Duration,
    /// Set to the time of the VM's first `KVM_RUN` (by whichever vCPU enters first).
    pub first_run: Arc<OnceLock<Instant>>,
    /// Start paused (as if `Pause` had been received while running) instead of parked: a
    /// clone or restored VM created paused; [`VcpuMsg::Resume`] starts it.
    pub start_paused: bool,
    /// Wait for the next message polling (see [`VcpuMsg::PauseAndSave`]); false to start.
    pub poll_next: bool,
}

/// How long an idle vCPU first waits before re-entering the guest when requests are queued
/// but the guest has posted no RX buffer (so that it can post some); doubled on every
/// consecutive idle without progress, up to [`MAX_NO_BUFFER_BACKOFF`].
pub const NO_BUFFER_BACKOFF: Duration = Duration::from_millis(1);
/// Upper bound of the no-buffer back-off.
const MAX_NO_BUFFER_BACKOFF: Duration = Duration::from_millis(64);

impl VcpuThread {
    /// Run the state machine until `Stop` or a terminal exit. Call on the vCPU's own thread.
    pub fn run(mut self) {
        self.vcpu.bind_to_current_thread();
        // SAFETY: pthread_self has no preconditions.
        self.control
            .set_thread(Some(unsafe { libc::pthread_self() }));
        let mut state = if self.start_paused {
            RunState::Paused { was_running: true }
        } else {
            RunState::Parked
        };
        while state != RunState::Done {
            state = match state {
                RunState::Running => self.step(),
                s if std::mem::take(&mut self.poll_next) => match recv_soon(&self.rx, None) {
                    Ok(m) => {
                        let next = self.handle(s, m);
                        // The resume of a first freeze comes right after its swap.
                        self.poll_next |= next != RunState::Running;
                        next
                    }
                    Err(_) => RunState::Done,
                },
                s => match self.rx.recv() {
                    Ok(m) => self.handle(s, m),
                    Err(_) => RunState::Done,
                },
            };
        }
        self.control.set_thread(None);
    }

    /// Handle one control message in state `s`; returns the new state.
    fn handle(&mut self, s: RunState, m: VcpuMsg) -> RunState {
        match m {
            VcpuMsg::Run if s == RunState::Parked => RunState::Running,
            VcpuMsg::Run => s,
            VcpuMsg::Pause(ack) => {
                let _ = ack.send(());
                s.paused()
            }
            VcpuMsg::PauseAndSave { ack, poll } => {
                self.poll_next = poll;
                let _ = ack.send(self.vcpu.save_state());
                s.paused()
            }
            VcpuMsg::Resume => match s {
                RunState::Paused { was_running: true } => RunState::Running,
                RunState::Paused { was_running: false } => RunState::Parked,
                other => other,
            },
            VcpuMsg::Stop => RunState::Done,
            VcpuMsg::Wake => s,
            VcpuMsg::Sample(tx) => {
                let _ = tx.send(self.vcpu.regs().map(|r| r.rip).unwrap_or(0));
                s
            }
            VcpuMsg::GetState(tx) => {
                let r = if s == RunState::Running {
                    Err(VmError::BadState(StateError {
                        op: VmOp::SaveState,
                        state: VmState::Running,
                    }))
                } else {
                    self.vcpu.save_state()
                };
                let _ = tx.send(r);
                s
            }
            VcpuMsg::SetState(st, tx) => {
                let r = if s == RunState::Running {
                    Err(VmError::BadState(StateError {
                        op: VmOp::SaveState,
                        state: VmState::Running,
                    }))
                } else {
                    self.vcpu.restore_state(&st)
                };
                let _ = tx.send(r);
                s
            }
            VcpuMsg::Swap(mut vcpu, tx) => {
                if s == RunState::Running {
                    let _ = tx.send(Err(vcpu));
                } else {
                    vcpu.bind_to_current_thread();
                    let _ = tx.send(Ok(std::mem::replace(&mut self.vcpu, vcpu)));
                }
                s
            }
        }
    }

    /// Drain queued messages without blocking.
    fn drain(&mut self, mut s: RunState) -> RunState {
        while let Ok(m) = self.rx.try_recv() {
            s = self.handle(s, m);
        }
        s
    }

    /// Enter the guest once and act on the exit.
    fn step(&mut self) -> RunState {
        if self.first_run.get().is_none() {
            let _ = self.first_run.set(Instant::now());
        }
        let action = match self.vcpu.run() {
            Ok(exit) => {
                let c = &self.counters;
                match &exit {
                    Exit::IoIn { .. } | Exit::IoOut { .. } => c.io.fetch_add(1, Ordering::Relaxed),
                    Exit::MmioRead { .. } | Exit::MmioWrite { .. } => {
                        c.mmio.fetch_add(1, Ordering::Relaxed)
                    }
                    Exit::Hlt => c.hlt.fetch_add(1, Ordering::Relaxed),
                    Exit::Interrupted => c.interrupted.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                dispatch(exit, &self.io, &self.mmio)
            }
            Err(e) => {
                self.host.terminate(ExitReason::Failed(e));
                return RunState::Done;
            }
        };
        match action {
            Action::Continue => RunState::Running,
            Action::Interrupted => self.drain(RunState::Running),
            Action::Idle => self.idle(),
            Action::CpuMode(v) => {
                self.host.cpu_mode(v);
                RunState::Running
            }
            Action::Ready(v) => {
                self.host.ready(v);
                RunState::Running
            }
            Action::PowerOff(code) => {
                self.host.terminate(ExitReason::PowerOff(code));
                RunState::Done
            }
            Action::GuestPanic(code) => {
                let serial_tail = self.host.console_tail();
                self.host.terminate(ExitReason::Failed(VmError::GuestPanic {
                    code,
                    serial_tail,
                }));
                RunState::Done
            }
            Action::Fault(f) => {
                let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
                let err = fault_error(f, rip, || self.host.console_tail());
                self.host.terminate(ExitReason::Failed(err));
                RunState::Done
            }
        }
    }

    /// The guest halted. The boot vCPU delivers queued requests and re-enters the guest if it
    /// delivered any; otherwise every vCPU waits for a message (a new request wakes it).
    fn idle(&mut self) -> RunState {
        loop {
            let mut wait = None;
            if self.id == 0 {
                let d = self.host.requests().on_guest_idle();
                if d.delivered > 0 {
                    self.backoff = NO_BUFFER_BACKOFF;
                    return RunState::Running;
                }
                if d.queued > 0 {
                    wait = Some(self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_NO_BUFFER_BACKOFF);
                }
                let (frames, net_wait) = self.host.net_idle();
                if frames > 0 || net_wait == Some(Duration::ZERO) {
                    return RunState::Running;
                }
                if let Some(t) = net_wait {
                    wait = Some(wait.map_or(t, |w: Duration| w.min(t)));
                }
            }
            let m = match wait {
                Some(t) => match self.rx.recv_timeout(t) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => return RunState::Running,
                    Err(RecvTimeoutError::Disconnected) => return RunState::Done,
                },
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return RunState::Done,
                },
            };
            let s = self.handle(RunState::Running, m);
            if s != RunState::Running {
                return s;
            }
        }
    }
}

/// The error for a guest fault at `rip`.
pub fn fault_error(f: Fault, rip: u64, console_tail: impl FnOnce() -> String) -> VmError {
    match f {
        Fault::UnknownPort(port) => VmError::UnknownPort { port, rip },
        Fault::UnknownMmio(addr) => VmError::UnknownMmio { addr, rip },
        Fault::TripleFault => VmError::TripleFault {
            rip,
            serial_tail: console_tail(),
        },
        Fault::InternalError(suberror) => VmError::InternalError { suberror, rip },
        Fault::FailEntry(reason) => VmError::FailEntry { reason, rip },
        Fault::Unhandled(what) => VmError::UnhandledExit { what, rip },
    }
}
