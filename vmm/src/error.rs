//! The VMM's public error type.
//!
//! Every variant says what happened to which VM and, where it helps, what to do about it.
//! `VmError` is `Clone` because one failure is handed to every waiter of a VM (pending
//! requests, `wait_ready`, `stop`).

use std::time::Duration;

use vmm_sys_util::errno;

/// Errors of the kscope VMM.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    /// The VM configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    BadConfig(String),

    /// The requested guest CPU mode is not available on this host.
    #[error("{0}")]
    ModeUnavailable(String),

    /// The kernel image could not be loaded.
    #[error("cannot load the guest kernel: {0}; pass an x86-64 ELF64 linked at KERNEL_VIRT_BASE + p_paddr with p_paddr >= 1 MiB")]
    Loader(String),

    /// A KVM ioctl or a host system call failed.
    #[error(
        "{op} failed: {source}; check that /dev/kvm is accessible and the host has memory left"
    )]
    Kvm {
        /// What the VMM was doing.
        op: &'static str,
        /// The host error.
        source: errno::Error,
    },

    /// Guest memory could not be accessed (an address outside guest RAM).
    #[error("guest memory access at GPA {gpa:#x} (+{len} bytes) is outside guest RAM")]
    GuestMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },

    /// The guest kernel reported a panic on the PANIC port.
    #[error("guest kernel panicked with code {code}; last console lines:\n{serial_tail}")]
    GuestPanic {
        /// The panic code (`kscope_guest::abi::panic_code`).
        code: u32,
        /// The last lines of the serial console.
        serial_tail: String,
    },

    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}; the guest's IDT, stacks or page tables are broken; last console lines:\n{serial_tail}")]
    TripleFault {
        /// Last known RIP.
        rip: u64,
        /// The last lines of the serial console.
        serial_tail: String,
    },

    /// KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR).
    #[error("KVM internal error (suberror {suberror}) at RIP {rip:#x}: the guest executed an instruction this platform cannot emulate (e.g. SSE at CPL0, see PLATFORM.md)")]
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// RIP of the failing instruction.
        rip: u64,
    },

    /// KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY).
    #[error("KVM failed to enter the guest (hardware reason {reason:#x}) at RIP {rip:#x}: the vCPU state is invalid")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// RIP at entry.
        rip: u64,
    },

    /// The guest accessed an I/O port without a device.
    #[error("guest accessed unknown I/O port {port:#x} at RIP {rip:#x}; only COM1 (0x3f8-0x3ff) and the POWEROFF/PANIC/READY ports exist")]
    UnknownPort {
        /// The port.
        port: u16,
        /// RIP of the access.
        rip: u64,
    },

    /// The guest accessed a guest-physical address with neither RAM nor a device.
    #[error("guest accessed unknown MMIO address {addr:#x} at RIP {rip:#x}; RAM ends at mem_bytes and devices are listed in BootInfo")]
    UnknownMmio {
        /// The address.
        addr: u64,
        /// RIP of the access.
        rip: u64,
    },

    /// KVM reported an exit the VMM does not handle.
    #[error("unhandled KVM exit {what} at RIP {rip:#x}")]
    UnhandledExit {
        /// Description of the exit.
        what: String,
        /// RIP.
        rip: u64,
    },

    /// The guest did not answer a request in time; the VM was marked failed.
    #[error("guest unresponsive: request {id} got no response within {timeout:?}; vCPU 0 was at RIP {rip:#x}; the VM was stopped")]
    Unresponsive {
        /// The request id.
        id: u64,
        /// The timeout that expired.
        timeout: Duration,
        /// RIP of vCPU 0 when the watchdog fired (0 if unknown).
        rip: u64,
    },

    /// The guest did not report READY in time.
    #[error("guest did not report READY within {timeout:?}; last console lines:\n{serial_tail}")]
    BootTimeout {
        /// The timeout.
        timeout: Duration,
        /// The last lines of the serial console.
        serial_tail: String,
    },

    /// The operation is not valid in the VM's state (see [`crate::lifecycle`]).
    #[error(transparent)]
    BadState(#[from] crate::lifecycle::StateError),

    /// The VM powered off or was stopped before the operation completed.
    #[error("VM stopped ({0}) before the operation completed")]
    Stopped(String),

    /// A request is too large for the request device.
    #[error("request payload of {len} bytes exceeds the maximum of {max} bytes")]
    RequestTooLarge {
        /// The payload length.
        len: usize,
        /// The maximum payload length.
        max: usize,
    },

    /// Lazy memory (userfaultfd serving, page images) failed.
    #[error("guest memory service failed: {0}")]
    Memory(String),

    /// A snapshot is damaged (bad magic, checksum, length, or inconsistent contents); nothing
    /// was created from it.
    #[error("snapshot {path} is corrupt: {what}; take the snapshot again")]
    SnapshotCorrupt {
        /// The file or directory.
        path: String,
        /// What is wrong.
        what: String,
    },

    /// A snapshot was written by an incompatible format version or host; nothing was created.
    #[error("snapshot {path} is incompatible: {what}")]
    SnapshotIncompatible {
        /// The file or directory.
        path: String,
        /// What does not match.
        what: String,
    },

    /// KVM refused a saved vCPU state (a snapshot or clone state it cannot load); nothing
    /// runs from it.
    #[error("KVM rejected the saved vCPU {vcpu} state: {op} failed with {source}; the snapshot's {part} is not valid on this host (take the snapshot again, on a host like this one)")]
    StateRejected {
        /// The vCPU index.
        vcpu: u32,
        /// The ioctl that refused it.
        op: &'static str,
        /// Which part of the state (registers, special registers, FPU, ...).
        part: &'static str,
        /// The host error (usually EINVAL).
        source: errno::Error,
    },

    /// Reading or writing a snapshot failed (I/O, no space).
    #[error("snapshot I/O failed: {0}")]
    SnapshotIo(String),

    /// An internal VMM thread failed (a bug).
    #[error("internal VMM error: {0}")]
    Internal(String),
}

impl From<crate::lazy::LazyError> for VmError {
    fn from(e: crate::lazy::LazyError) -> Self {
        VmError::from_lazy(&e)
    }
}

impl VmError {
    /// The VM-level error of a lazy-memory error: a page that failed its snapshot checksum is
    /// [`VmError::SnapshotCorrupt`] naming the memory file.
    pub fn from_lazy(e: &crate::lazy::LazyError) -> Self {
        match e {
            crate::lazy::LazyError::Corrupt { gfn, path, what } => VmError::SnapshotCorrupt {
                path: path.clone(),
                what: format!("guest page {gfn}: {what}; the page was not given to the guest"),
            },
            e => VmError::Memory(e.to_string()),
        }
    }

    /// Build a [`VmError::Kvm`] from the current `errno`-style error.
    pub fn kvm(op: &'static str, source: errno::Error) -> Self {
        VmError::Kvm { op, source }
    }
}
