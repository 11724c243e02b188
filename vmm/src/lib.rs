//! kscope VMM: a minimal virtual machine monitor on KVM for kscope's own guest kernel.
//!
//! - [`Vm`] boots a kernel ELF per the boot contract of `kscope_guest::abi`, runs one thread
//!   per vCPU ([`vcpu`]) and serves the guest's devices: COM1 serial, the POWEROFF / PANIC /
//!   READY ports, a read-only virtio-blk disk and the kscope request device (both over
//!   virtio-mmio).
//! - [`hypervisor`] is the boundary to KVM; [`exit::dispatch`] maps exits to actions.
//! - Guest RAM lives on a memfd ([`memory`]) so that it can later be cloned copy-on-write.

pub mod boot;
pub mod clone;
pub mod dedup;
pub mod devices;
pub mod error;
pub mod exit;
pub mod hypervisor;
pub mod loader;
pub mod memory;
pub mod mode;
pub mod net;
pub mod prefetch;
pub mod vcpu;
pub mod vm;

pub use clone::{
    CloneBatch, CloneContext, CloneOptions, Generation, MemoryMode, MemoryStats, PrefetcherFactory,
};
pub use devices::request::{PendingResponse, RequestTransport, Response};
pub use error::VmError;
pub use mode::{CpuMode, GuestMode};
pub use vcpu::{ExitCounts, ExitReason};
pub use vm::{BootReport, ExitReport, Vm, VmConfig, VmState};
pub mod lazy;
pub mod snapfile;
pub mod snapshot;
pub mod uffd;
