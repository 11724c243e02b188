//! kscope VMM: a minimal virtual machine monitor on KVM for kscope's own guest kernel.
//!
//! - [`Vm`] boots a kernel ELF per the boot contract of `kscope_guest::abi`, runs one thread
//!   per vCPU ([`vcpu`]) and serves the guest's devices: COM1 serial, the POWEROFF / PANIC /
//!   READY ports, a read-only virtio-blk disk and the kscope request device (both over
//!   virtio-mmio). Its lifecycle is one table ([`lifecycle`]).
//! - [`hypervisor`] is the boundary to KVM (neutral traits and state types); [`exit::dispatch`]
//!   maps exits to actions.
//! - Guest RAM lives on a memfd ([`memory`], plumbing in [`hostmem`]) so that it can later be
//!   frozen ([`Vm::freeze`] -> [`Generation`]) and cloned ([`Generation::spawn`]), lazily
//!   ([`lazy`]) or eagerly; whole-VM state (capture, restore, serialized form) is [`state`].

pub mod boot;
pub mod clone;
pub mod config;
pub mod dedup;
pub mod devices;
pub mod error;
pub mod exit;
pub mod generation;
pub mod hostmem;
pub mod hypervisor;
pub mod lazy;
pub mod lifecycle;
pub mod loader;
pub mod memory;
pub mod mode;
pub mod net;
pub mod pagemap;
pub mod pool;
pub mod prefetch;
pub mod snapfile;
pub mod snapshot;
pub mod state;
pub mod summary;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod worker;

pub use clone::{
    CloneBatch, CloneContext, CloneOptions, MemoryMode, PrefetcherFactory, SpawnBreakdown,
};
pub use config::VmConfig;
pub use devices::request::{PendingResponse, RequestTransport, Response};
pub use error::VmError;
pub use generation::{FreezeReport, Generation};
pub use lifecycle::{StateError, VmOp, VmState};
pub use memory::MemoryStats;
pub use mode::{CpuMode, GuestMode};
pub use vcpu::{ExitCounts, ExitReason};
pub use vm::{BootReport, ExitReport, Vm};
