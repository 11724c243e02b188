//! Devices: the I/O and MMIO buses, the COM1 serial console, the virtio-mmio transport and the
//! virtio devices (read-only block device, kscope request device).

pub mod block;
pub mod bus;
pub mod request;
pub mod serial;
pub mod virtio_mmio;
