//! What a VM is made of: [`VmConfig`] and its validation.

use std::sync::Arc;

use crate::error::VmError;
use crate::mode::GuestMode;
use crate::net::NetAttach;

/// Largest number of vCPUs.
pub const MAX_VCPUS: u32 = 64;

/// What to boot.
#[derive(Clone)]
pub struct VmConfig {
    /// Name (for threads, the memfd and logs).
    pub name: String,
    /// Guest RAM in bytes (a multiple of 2 MiB, 4 MiB to 8 GiB).
    pub mem_bytes: u64,
    /// Number of vCPUs (the kernel uses vCPU 0; the others stay parked).
    pub vcpus: u32,
    /// The kernel ELF.
    pub kernel: Arc<[u8]>,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk image (read-only; a multiple of 512 bytes; may be empty).
    pub disk: Arc<[u8]>,
    /// A virtio-net device on this tap with this address (`None`: no network).
    pub net: Option<NetAttach>,
    /// How the guest kernel should run (native where the host allows it, by default).
    pub guest_mode: GuestMode,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("name", &self.name)
            .field("mem_bytes", &self.mem_bytes)
            .field("vcpus", &self.vcpus)
            .field("kernel_len", &self.kernel.len())
            .field("cmdline", &self.cmdline)
            .field("disk_len", &self.disk.len())
            .field("net", &self.net.as_ref().map(|n| n.ip))
            .field("guest_mode", &self.guest_mode)
            .finish()
    }
}

impl VmConfig {
    pub(crate) fn validate(&self) -> Result<(), VmError> {
        crate::memory::validate_size(self.mem_bytes)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::BadConfig(format!(
                "vcpus = {}, must be 1..={MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.kernel.is_empty() {
            return Err(VmError::BadConfig("the kernel image is empty".into()));
        }
        if !self.disk.len().is_multiple_of(512) {
            return Err(VmError::BadConfig(format!(
                "disk image is {} bytes, not a multiple of 512; pad it",
                self.disk.len()
            )));
        }
        Ok(())
    }
}
