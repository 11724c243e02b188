//! The hypervisor boundary.
//!
//! The rest of the VMM talks to the hypervisor only through the object-safe traits
//! [`Hypervisor`], [`HvVm`] and [`HvVcpu`] (obtained from [`host`]), sees exits only as
//! [`Exit`], and holds saved state only in the neutral [`VcpuState`] and [`ClockState`]. The
//! KVM implementation lives in [`kvm`]; it is the only module that touches `kvm-ioctls` /
//! `kvm-bindings`. A second backend (another hypervisor, or another mode of this one) is a
//! new module here implementing the traits, plus its [`ArchState`] variant; `vm.rs`, `clone/`
//! and `state.rs` do not change.

pub mod kvm;

use serde::{Deserialize, Serialize};

use crate::error::VmError;

/// Why a vCPU left the guest, in the VMM's own terms.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit<'a> {
    /// `in` from `port`: fill `data` before the next run.
    IoIn {
        /// The port.
        port: u16,
        /// Buffer to fill (1, 2 or 4 bytes; more for `rep ins`).
        data: &'a mut [u8],
    },
    /// `out` to `port` with `data`.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// A read of an address that is not RAM: fill `data` before the next run.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// A write to an address that is not RAM.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The guest executed `hlt`.
    Hlt,
    /// The guest triple-faulted.
    Shutdown,
    /// The hypervisor could not emulate an instruction.
    InternalError {
        /// Hypervisor-specific sub-error.
        suberror: u32,
    },
    /// The hypervisor could not enter the guest.
    FailEntry {
        /// Hardware failure reason.
        reason: u64,
    },
    /// The run was interrupted by a kick (signal) before or while running the guest.
    Interrupted,
    /// Any other exit.
    Unknown(String),
}

/// A segment register, as loaded into the hidden part of the register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit (byte granular after applying `g`).
    pub limit: u32,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (4 KiB).
    pub g: bool,
}

/// A descriptor-table register (GDTR/IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescTable {
    /// Linear base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// Special registers a VMM sets before the first instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    /// Code segment.
    pub cs: Segment,
    /// Data segment used for DS, ES, FS, GS and SS.
    pub data: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDTR.
    pub gdt: DescTable,
    /// IDTR.
    pub idt: DescTable,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// General-purpose registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Complete boot-time CPU state of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootCpuState {
    /// Special registers.
    pub sregs: SpecialRegs,
    /// General registers.
    pub regs: Regs,
}

/// A model-specific register and its value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub value: u64,
}

/// Saved architectural state of one vCPU, in the VMM's terms: the general registers and the
/// MSRs as neutral values (a list of index/value pairs, restored in order), and the rest
/// (special registers, FPU/XSAVE, XCRs, pending events, debug registers, MP state) in the form
/// of the backend that saved it. Serializable: it is part of the snapshot format (see
/// `crate::state` for the version rule).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: Regs,
    /// Model-specific registers, in restore order.
    pub msrs: Vec<Msr>,
    /// Backend-specific rest of the state.
    pub arch: ArchState,
}

impl VcpuState {
    /// RIP at the time of the save.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.value)
    }

    /// True if the vCPU ran its kernel natively (PVM's switch registered) when saved.
    pub fn native(&self) -> bool {
        use kscope_guest::abi::boot::pvm;
        self.msr(pvm::MSR_NATIVE).is_some_and(pvm::is_registered)
    }

    /// Checks a state read from disk before any backend sees it: a 64-bit long-mode state
    /// whose page tables lie inside `mem_bytes` of guest RAM, every field in range. The error
    /// names the field and the value.
    pub fn validate(&self, mem_bytes: u64) -> Result<(), String> {
        match &self.arch {
            ArchState::Kvm(a) => a.validate(&self.regs, &self.msrs, mem_bytes),
        }
    }

    /// Checks a serialized vCPU state (one element of `machine.vcpus`) for what parsing
    /// cannot see, before it is parsed: the exact lengths of the backend's binary blocks.
    pub fn check_serialized(v: &serde_json::Value) -> Result<(), String> {
        match v.get("arch") {
            Some(serde_json::Value::Object(m)) if m.len() == 1 => match m.get("Kvm") {
                Some(a) => kvm::check_raw_lengths(a),
                None => Err("arch names an unknown backend".into()),
            },
            _ => Err("arch is missing or not one backend's state".into()),
        }
    }
}

/// The backend-specific part of a [`VcpuState`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ArchState {
    /// Saved by the KVM backend.
    Kvm(kvm::KvmArchState),
}

/// A VM's paravirtual clock (kvmclock): nanoseconds since the VM's clock epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Clock value in nanoseconds.
    pub ns: u64,
}

/// A hypervisor: creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Create an empty VM.
    fn create_vm(&self) -> Result<Box<dyn HvVm>, VmError>;
}

/// The hypervisor of this host (KVM).
pub fn host() -> &'static dyn Hypervisor {
    &kvm::KvmHypervisor
}

/// A VM of a hypervisor: memory slots, vCPUs and the clock.
pub trait HvVm: Send + Sync + std::fmt::Debug {
    /// Map `size` bytes of host memory at `host_addr` as guest-physical `[gpa, gpa+size)` in
    /// memory slot `slot` (replacing nothing: the slot must be empty).
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr+size` must be a valid, page-aligned mapping of this process that
    /// stays mapped until the slot is removed (the guest reads and writes it at any time).
    unsafe fn set_memory_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), VmError>;

    /// Remove memory slot `slot` (no vCPU may be running).
    fn remove_memory_slot(&self, slot: u32, gpa: u64) -> Result<(), VmError>;

    /// Create vCPU `id`.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, VmError>;

    /// The VM's clock.
    fn clock(&self) -> Result<ClockState, VmError>;

    /// Set the VM's clock (before its vCPUs first run).
    fn set_clock(&self, clock: &ClockState) -> Result<(), VmError>;
}

/// A vCPU: runs on one thread at a time.
pub trait HvVcpu: Send + std::fmt::Debug {
    /// Set CPUID, FPU and the given registers.
    fn configure(&mut self, state: &BootCpuState, vcpu_count: u32) -> Result<(), VmError>;
    /// TSC frequency in kHz.
    fn tsc_khz(&self) -> Result<u64, VmError>;
    /// Enter the guest until the next exit.
    fn run(&mut self) -> Result<Exit<'_>, VmError>;
    /// Current general registers.
    fn regs(&self) -> Result<Regs, VmError>;
    /// Save the full vCPU state (no vCPU thread may be running this vCPU).
    fn save_state(&self) -> Result<VcpuState, VmError>;
    /// Restore a saved vCPU state (of this backend: another backend's is refused).
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), VmError>;
    /// Like [`restore_state`](Self::restore_state), for a state this process just saved (a
    /// clone, a VM moving onto a standby): parts of it may be loaded by the next run instead
    /// of now, which saves ioctls, so a state the hypervisor refuses fails that run rather
    /// than this call. Snapshots from files go through `restore_state`.
    fn load_state(&mut self, state: &VcpuState) -> Result<(), VmError> {
        self.restore_state(state)
    }
    /// True if the host can run this guest's kernel natively (PVM's native-supervisor
    /// switch, `kscope_guest::abi::boot::pvm`).
    fn native_available(&self) -> bool;
    /// Set CPUID only (before [`restore_state`](Self::restore_state) on a fresh vCPU).
    fn cpuid(&mut self, vcpu_count: u32) -> Result<(), VmError>;
    /// Make kicks of the calling thread (see [`kick_signal`]) interrupt this vCPU's run.
    /// Call on the thread that runs the vCPU, before its first run.
    fn bind_to_current_thread(&mut self);
}

/// The real-time signal that kicks a vCPU thread out of the guest.
pub fn kick_signal() -> libc::c_int {
    kvm::kick_signal()
}
