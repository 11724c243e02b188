//! Devices: the I/O and MMIO buses, the COM1 serial console, the virtio-mmio transport and the
//! virtio devices (read-only block device, kscope request device).

pub mod block;
pub mod bus;
pub mod net;
pub mod request;
pub mod serial;
pub mod virtio_mmio;

use serde::{Deserialize, Serialize};

/// Saved state of a VM's devices (for clones and snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: serial::SerialSnapshot,
    /// The virtio-blk transport.
    pub block: virtio_mmio::TransportState,
    /// The request device transport.
    pub request: virtio_mmio::TransportState,
    /// The virtio-net transport (VMs with a network).
    #[serde(default)]
    pub net: Option<virtio_mmio::TransportState>,
}
