//! Devices: the I/O and MMIO buses, the COM1 serial console, the virtio-mmio transport and the
//! virtio devices (read-only block device, kscope request device).

pub mod block;
pub mod bus;
pub mod net;
pub mod request;
pub mod serial;
pub mod virtio_mmio;

use std::sync::{Arc, Mutex};

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
    /// The virtio-net transport (VMs with a network; absent in states written before 2.2).
    #[serde(default)]
    pub net: Option<virtio_mmio::TransportState>,
}

/// The devices of a VM, shared with its buses.
pub(crate) struct DeviceSet {
    pub(crate) serial: Arc<Mutex<serial::SerialDevice>>,
    pub(crate) block: Arc<Mutex<virtio_mmio::MmioTransport<block::BlockDevice>>>,
    pub(crate) request: Arc<Mutex<virtio_mmio::MmioTransport<request::RequestDevice>>>,
    pub(crate) net: Option<Arc<Mutex<virtio_mmio::MmioTransport<net::NetDevice>>>>,
    /// Wakes the idle vCPU on incoming frames (dropped with the VM).
    pub(crate) _tap_watcher: Option<net::TapWatcher>,
}

impl DeviceSet {
    /// Capture every device's state (the VM must be paused).
    pub(crate) fn save_states(&self) -> DeviceStates {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(|p| p.into_inner())
        }
        DeviceStates {
            serial: lock(&self.serial).save_state(),
            block: lock(&self.block).save_state(),
            request: lock(&self.request).save_state(),
            net: self.net.as_deref().map(|n| lock(n).save_state()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_states_written_before_the_net_device_still_load() {
        let with_net = DeviceStates {
            net: Some(virtio_mmio::TransportState {
                status: 15,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut v = serde_json::to_value(&with_net).unwrap();
        let back: DeviceStates = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, with_net);
        // A 2.0 state has no `net` key at all.
        v.as_object_mut().unwrap().remove("net");
        let old: DeviceStates = serde_json::from_value(v).unwrap();
        assert_eq!(old.net, None);
        assert_eq!(old.request, with_net.request);
    }
}
