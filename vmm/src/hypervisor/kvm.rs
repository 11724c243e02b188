//! The KVM implementation of the hypervisor boundary (the only module that uses
//! `kvm-ioctls` / `kvm-bindings`).
//!
//! Kicks: a vCPU thread binds its `kvm_run` page in a thread-local; the kick signal's handler
//! sets `immediate_exit` there, so a kick that arrives while the thread is outside `KVM_RUN`
//! still makes the next `KVM_RUN` return at once with `EINTR` (no lost wake-ups).

use std::cell::Cell;
use std::ptr;
use std::sync::{Once, OnceLock};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::{
    ArchState, BootCpuState, ClockState, DescTable, Exit, HvVcpu, HvVm, Hypervisor, Msr, Regs,
    Segment, VcpuState,
};
use crate::error::VmError;
use kscope_guest::abi::boot::pvm;

mod sync;
mod validate;

use sync::{SyncArea, Synced};

pub(crate) use validate::check_raw_lengths;

/// MSRs never saved: IA32_TSC is restored separately (first, so that KVM's TSC
/// synchronisation sees it before TSC-relative MSRs such as the TSC deadline).
const MSR_TSC: u32 = 0x10;

thread_local! {
    /// The `kvm_run` page of the vCPU run by this thread (null if none).
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

static KICK_INIT: Once = Once::new();

extern "C" fn kick_handler(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    // Only async-signal-safe work: a const-initialised thread-local read and a volatile store.
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: `run` points to the mmap'ed `kvm_run` page of the vCPU owned by this thread,
        // set by `bind_to_current_thread` and cleared before the vCPU is dropped.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// The kick signal (SIGRTMIN + 1), with its handler installed.
pub fn kick_signal() -> c_int {
    let sig = SIGRTMIN() + 1;
    KICK_INIT.call_once(|| {
        // The handler is idempotent and process-wide; failure leaves kicks to EINTR only.
        if let Err(e) = register_signal_handler(sig, kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
    sig
}

fn kvm_err(op: &'static str) -> impl FnOnce(errno::Error) -> VmError {
    move |e| VmError::kvm(op, e)
}

/// Process-wide handle to `/dev/kvm`.
fn kvm() -> Result<&'static Kvm, VmError> {
    static KVM: OnceLock<Kvm> = OnceLock::new();
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let k = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    Ok(KVM.get_or_init(|| k))
}

/// KVM_GET_SUPPORTED_CPUID, cached.
fn supported_cpuid() -> Result<CpuId, VmError> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c.clone());
    }
    let c = kvm()?
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(CPUID.get_or_init(|| c).clone())
}

/// KVM as a [`Hypervisor`].
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmHypervisor;

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn HvVm>, VmError> {
        let fd = kvm()?.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(Box::new(KvmVm { fd }))
    }
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
}

impl HvVm for KvmVm {
    unsafe fn set_memory_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range is a valid mapping that outlives the
        // slot (this function's contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn remove_memory_slot(&self, slot: u32, gpa: u64) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (delete)"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, VmError> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }

    /// KVM_GET_CLOCK.
    fn clock(&self) -> Result<ClockState, VmError> {
        let c = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        Ok(ClockState { ns: c.clock })
    }

    /// KVM_SET_CLOCK: only the clock value is meaningful to KVM here.
    fn set_clock(&self, clock: &ClockState) -> Result<(), VmError> {
        let c = kvm_clock_data {
            clock: clock.ns,
            ..Default::default()
        };
        self.fd.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}

impl KvmVm {
    fn create_kvm_vcpu(&self, id: u32) -> Result<KvmVcpu, VmError> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let sync = SyncArea::enable(&mut fd);
        // What vCPU 0 starts with, read once (from the first one, still as made).
        if id == 0 {
            fresh_parts(&fd);
        }
        Ok(KvmVcpu {
            fd,
            id,
            bound: false,
            sync,
            fresh: true,
        })
    }
}

/// The KVM-specific part of a saved vCPU ([`ArchState::Kvm`]): special registers, FPU/SSE
/// (and the whole XSAVE area where KVM offers it), XCRs, pending events, debug registers and
/// the MP state. The general registers and every MSR KVM lists and can read are saved in the
/// neutral part of [`VcpuState`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmArchState {
    sregs: kvm_sregs,
    #[serde(with = "fpu_bytes")]
    fpu: kvm_fpu,
    /// The 4 KiB XSAVE area (`kvm_xsave.region`).
    xsave: Option<Vec<u32>>,
    xcrs: Option<kvm_xcrs>,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
    mp_state: kvm_mp_state,
}

/// `kvm_fpu` (plain integers, no padding) as bytes in serialized states.
mod fpu_bytes {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(f: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        kscope_guest::abi::as_bytes(f).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let b = Vec::<u8>::deserialize(d)?;
        if b.len() != std::mem::size_of::<kvm_fpu>() {
            return Err(serde::de::Error::custom("kvm_fpu of the wrong size"));
        }
        kscope_guest::abi::from_bytes(&b).ok_or_else(|| serde::de::Error::custom("kvm_fpu"))
    }
}

/// The MSRs to save: KVM_GET_MSR_INDEX_LIST minus those this host cannot read (probed once on
/// a live vCPU), IA32_TSC first.
fn saved_msr_list(vcpu: &VcpuFd) -> Result<&'static [u32], VmError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l);
    }
    let all = kvm()?
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut list: Vec<u32> = vec![MSR_TSC];
    list.extend(all.as_slice().iter().copied().filter(|&m| m != MSR_TSC));
    // PVM's native-mode switch is not in KVM's list; it must travel with the vCPU state, or
    // a clone's kernel would run in the instruction emulator.
    if pvm_signature(vcpu) {
        list.push(pvm::MSR_NATIVE);
    }
    // KVM_GET_MSRS stops at the first MSR it cannot read: drop that one and try again.
    let mut start = 0;
    while start < list.len() {
        let entries: Vec<kvm_msr_entry> = list[start..]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmError::Internal(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        start += n;
        if start < list.len() {
            list.remove(start);
        }
    }
    Ok(LIST.get_or_init(|| list))
}

/// Read one MSR (`None` if KVM cannot read it).
fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// True if this host's KVM is PVM with the native-supervisor interface (its signature MSR
/// reads "PVM"); probed once.
fn pvm_signature(vcpu: &VcpuFd) -> bool {
    static PVM: OnceLock<bool> = OnceLock::new();
    *PVM.get_or_init(|| read_msr(vcpu, pvm::MSR_SIGNATURE) == Some(pvm::SIGNATURE))
}

/// Size of the XSAVE area KVM uses, if the 4 KiB `kvm_xsave` holds it.
fn xsave_fits() -> bool {
    static FITS: OnceLock<bool> = OnceLock::new();
    *FITS.get_or_init(|| {
        kvm().is_ok_and(|k| {
            k.check_extension(Cap::Xsave) && {
                let n = k.check_extension_int(Cap::Xsave2);
                (0..=4096).contains(&n)
            }
        })
    })
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
    bound: bool,
    /// What the `kvm_run` page holds of the state ([`sync`]).
    sync: SyncArea,
    /// Nothing has been set or run on this vCPU since it was made (but CPUID).
    fresh: bool,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        if self.bound {
            let mine = self.fd.get_kvm_run() as *mut kvm_run;
            KVM_RUN_PTR.with(|p| {
                if p.get() == mine {
                    p.set(ptr::null_mut());
                }
            });
        }
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

fn to_kvm_regs(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn from_kvm_regs(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn set_table(t: &DescTable) -> kvm_bindings::kvm_dtable {
    kvm_bindings::kvm_dtable {
        base: t.base,
        limit: t.limit,
        ..Default::default()
    }
}

impl KvmVcpu {
    fn set_cpuid(&self, vcpu_count: u32) -> Result<(), VmError> {
        let mut cpuid = supported_cpuid()?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id and logical processor count.
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (self.id << 24) | ((vcpu_count & 0xff) << 16);
                }
                // x2APIC id.
                0xb | 0x1f => e.edx = self.id,
                _ => {}
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))
    }
}

impl HvVcpu for KvmVcpu {
    fn configure(&mut self, state: &BootCpuState, vcpu_count: u32) -> Result<(), VmError> {
        self.sync.invalidate(&mut self.fd);
        self.fresh = false;
        self.set_cpuid(vcpu_count)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

        let s = &state.sregs;
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cs = to_kvm_segment(&s.cs);
        let data = to_kvm_segment(&s.data);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = to_kvm_segment(&s.tr);
        sregs.gdt = set_table(&s.gdt);
        sregs.idt = set_table(&s.idt);
        sregs.cr0 = s.cr0;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&to_kvm_regs(&state.regs))
            .map_err(kvm_err("KVM_SET_REGS"))
    }

    fn tsc_khz(&self) -> Result<u64, VmError> {
        self.fd
            .get_tsc_khz()
            .map(u64::from)
            .map_err(kvm_err("KVM_GET_TSC_KHZ"))
    }

    fn run(&mut self) -> Result<Exit<'_>, VmError> {
        let run_ptr = self.fd.get_kvm_run() as *mut kvm_run;
        self.fresh = false;
        let result = self.fd.run();
        // Every return through KVM's exit path (exits, EINTR, EAGAIN) filled the sync area.
        self.sync.after_run(match &result {
            Ok(_) => true,
            Err(e) => e.errno() == libc::EINTR || e.errno() == libc::EAGAIN,
        });
        let exit = match result {
            Ok(VcpuExit::IoIn(port, data)) => return Ok(Exit::IoIn { port, data }),
            Ok(VcpuExit::IoOut(port, data)) => return Ok(Exit::IoOut { port, data }),
            Ok(VcpuExit::MmioRead(addr, data)) => return Ok(Exit::MmioRead { addr, data }),
            Ok(VcpuExit::MmioWrite(addr, data)) => return Ok(Exit::MmioWrite { addr, data }),
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Exit::FailEntry { reason },
            Ok(VcpuExit::InternalError) => {
                // SAFETY: `run_ptr` is this vCPU's mapped `kvm_run` page; the exit reason says
                // the `internal` member of the union is valid.
                let suberror = unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror };
                Exit::InternalError { suberror }
            }
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(other) => Exit::Unknown(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => return Err(VmError::kvm("KVM_RUN", e)),
        };
        if exit == Exit::Interrupted {
            // SAFETY: `run_ptr` is this vCPU's mapped `kvm_run` page; the kick handler writes
            // the same byte only on this thread (signal context), never concurrently.
            unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run_ptr).immediate_exit), 0) };
        }
        Ok(exit)
    }

    fn regs(&self) -> Result<Regs, VmError> {
        self.fd
            .get_regs()
            .map(|r| from_kvm_regs(&r))
            .map_err(kvm_err("KVM_GET_REGS"))
    }

    fn save_state(&self) -> Result<VcpuState, VmError> {
        let fd = &self.fd;
        // Registers, special registers and events from the last exit where KVM left them.
        let Synced {
            regs,
            sregs,
            events,
        } = match self.sync.read(fd) {
            Some(s) => s,
            None => Synced {
                regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
                events: fd
                    .get_vcpu_events()
                    .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            },
        };
        let xsave = if xsave_fits() {
            Some(
                fd.get_xsave()
                    .map_err(kvm_err("KVM_GET_XSAVE"))?
                    .region
                    .to_vec(),
            )
        } else {
            None
        };
        // The FPU is the XSAVE area's legacy region where there is one.
        let fpu = match xsave.as_deref().and_then(sync::fpu_from_xsave) {
            Some(f) => f,
            None => fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
        };
        let xcrs = fd.get_xcrs().ok();
        let entries: Vec<kvm_msr_entry> = saved_msr_list(fd)?
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmError::Internal(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n]
            .iter()
            .map(|e| Msr {
                index: e.index,
                value: e.data,
            })
            .collect();
        let debugregs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        Ok(VcpuState {
            regs: from_kvm_regs(&regs),
            msrs,
            arch: ArchState::Kvm(KvmArchState {
                sregs,
                fpu,
                xsave,
                xcrs,
                events,
                debugregs,
                mp_state,
            }),
        })
    }

    fn restore_state(&mut self, saved: &VcpuState) -> Result<(), VmError> {
        self.sync.invalidate(&mut self.fd);
        self.fresh = false;
        restore_kvm(&self.fd, saved, Load::Checked).map_err(|e| rejected(self.id, e))
    }

    fn load_state(&mut self, saved: &VcpuState) -> Result<(), VmError> {
        let ArchState::Kvm(state) = &saved.arch;
        let synced = Synced {
            regs: to_kvm_regs(&saved.regs),
            sregs: state.sregs,
            events: state.events,
        };
        if !self.sync.defer(&mut self.fd, synced) {
            return self.restore_state(saved);
        }
        // Only vCPU 0's start is known (the MP state of others depends on the irqchip).
        let fresh = std::mem::replace(&mut self.fresh, false) && self.id == 0;
        restore_kvm(&self.fd, saved, Load::Deferred { fresh }).map_err(|e| rejected(self.id, e))
    }

    fn native_available(&self) -> bool {
        pvm_signature(&self.fd)
    }

    fn cpuid(&mut self, vcpu_count: u32) -> Result<(), VmError> {
        self.set_cpuid(vcpu_count)
    }

    fn bind_to_current_thread(&mut self) {
        kick_signal();
        let run = self.fd.get_kvm_run() as *mut kvm_run;
        KVM_RUN_PTR.with(|p| p.set(run));
        self.bound = true;
    }
}

/// How [`restore_kvm`] loads a state.
#[derive(Clone, Copy)]
enum Load {
    /// Every part by ioctl, checked now ([`HvVcpu::restore_state`]).
    Checked,
    /// The registers, special registers and events are in the sync area for the next
    /// `KVM_RUN`, the FPU comes with the XSAVE area where there is one, and on a vCPU that was
    /// just made (`fresh`), parts equal to what it starts with are not set again
    /// ([`HvVcpu::load_state`]).
    Deferred { fresh: bool },
}

/// The MP state and debug registers a vCPU starts with (read once, from the first vCPU
/// made).
struct FreshParts {
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

fn fresh_parts(fd: &VcpuFd) -> Option<&'static FreshParts> {
    static FRESH: OnceLock<Option<FreshParts>> = OnceLock::new();
    FRESH
        .get_or_init(|| {
            Some(FreshParts {
                mp_state: fd.get_mp_state().ok()?,
                debugregs: fd.get_debug_regs().ok()?,
            })
        })
        .as_ref()
}

/// Restores a saved vCPU state into `fd` (see [`Load`]).
fn restore_kvm(fd: &VcpuFd, saved: &VcpuState, how: Load) -> Result<(), VmError> {
    let ArchState::Kvm(state) = &saved.arch;
    let (deferred, fresh) = match how {
        Load::Checked => (false, None),
        Load::Deferred { fresh } => (true, fresh.then(|| fresh_parts(fd)).flatten()),
    };
    use kscope_guest::abi::as_bytes;
    // Parts a fresh vCPU already has, byte for byte, need no ioctl.
    let mp_as_made = fresh.is_some_and(|p| as_bytes(&p.mp_state) == as_bytes(&state.mp_state));
    let dr_as_made = fresh.is_some_and(|p| as_bytes(&p.debugregs) == as_bytes(&state.debugregs));
    if !mp_as_made {
        fd.set_mp_state(state.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    if !deferred {
        fd.set_sregs(&state.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        fd.set_regs(&to_kvm_regs(&saved.regs))
            .map_err(kvm_err("KVM_SET_REGS"))?;
    }
    // KVM_SET_XSAVE sets the whole FPU (its legacy region); KVM_SET_FPU only where it is not.
    if !deferred || state.xsave.is_none() || !xsave_fits() {
        fd.set_fpu(&state.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    }
    if let Some(region) = &state.xsave {
        let mut x = kvm_xsave::default();
        if region.len() != x.region.len() {
            return Err(VmError::BadConfig(format!(
                "saved XSAVE area has {} words, expected {}",
                region.len(),
                x.region.len()
            )));
        }
        x.region.copy_from_slice(region);
        if xsave_fits() {
            // SAFETY: `xsave_fits` checked that KVM's XSAVE area fits the 4 KiB
            // `kvm_xsave`, so the kernel reads only inside the struct.
            unsafe { fd.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
    }
    if let Some(x) = &state.xcrs {
        fd.set_xcrs(x).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    // KVM_SET_MSRS stops at the first MSR it refuses (e.g. a paravirtual MSR whose CPUID
    // feature is hidden): skip that one and set the rest.
    let entries: Vec<kvm_msr_entry> = saved
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.value,
            ..Default::default()
        })
        .collect();
    let mut rest: &[kvm_msr_entry] = &entries;
    while !rest.is_empty() {
        let msrs =
            Msrs::from_entries(rest).map_err(|e| VmError::Internal(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < rest.len() {
            tracing::debug!("KVM_SET_MSRS refused MSR {:#x}; skipped", rest[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    // A vCPU that ran natively must run natively here too: the kernel's processes may
    // use `syscall`, which the emulated mode cannot run.
    if let Some(m) = saved.msrs.iter().find(|m| m.index == pvm::MSR_NATIVE) {
        if pvm::is_registered(m.value) && read_msr(fd, pvm::MSR_NATIVE) != Some(m.value) {
            return Err(VmError::BadConfig(format!(
                "the saved vCPU ran the guest kernel natively (PVM MSR {:#x} = {:#x}) but this \
                 host did not accept that value: restore it on a PVM host with the native \
                 switch",
                pvm::MSR_NATIVE,
                m.value
            )));
        }
    }
    if !dr_as_made {
        fd.set_debug_regs(&state.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    }
    if deferred {
        return Ok(());
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
}

/// KVM refusing a saved state with EINVAL means the state, not the host, is wrong: say so
/// and name the part.
fn rejected(vcpu: u32, e: VmError) -> VmError {
    match e {
        VmError::Kvm { op, source } if source.errno() == libc::EINVAL => {
            let part = match op {
                "KVM_SET_MP_STATE" => "multiprocessing state (mp_state)",
                "KVM_SET_SREGS" => "special registers (sregs: segments, control registers, EFER)",
                "KVM_SET_REGS" => "general registers (regs: RIP, RSP, RFLAGS)",
                "KVM_SET_FPU" => "FPU state (fpu)",
                "KVM_SET_XSAVE" => "XSAVE area (xsave)",
                "KVM_SET_XCRS" => "extended control registers (xcrs)",
                "KVM_SET_MSRS" => "model-specific registers (msrs)",
                "KVM_SET_VCPU_EVENTS" => "pending events (events)",
                "KVM_SET_DEBUGREGS" => "debug registers (debugregs)",
                _ => "vCPU state",
            };
            VmError::StateRejected {
                vcpu,
                op,
                part,
                source,
            }
        }
        e => e,
    }
}
