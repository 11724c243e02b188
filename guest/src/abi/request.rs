//! The kscope request device: how the host sends requests to the guest workload.
//!
//! A virtio device over virtio-mmio (version 2) with device id [`DEVICE_ID`] and two split
//! virtqueues:
//!
//! - queue [`RX_QUEUE`] (host -> guest): the guest posts device-writable buffers; the device
//!   fills one buffer per request with a [`RequestHeader`] followed by the payload and puts it
//!   on the used ring;
//! - queue [`TX_QUEUE`] (guest -> host): the guest posts a driver-readable descriptor chain per
//!   response, a [`ResponseHeader`] followed by the payload, and notifies the queue.
//!
//! Notification: the guest does not take interrupts. When it has nothing to do it executes
//! `hlt`; that exits to the VMM, which moves pending requests into the RX queue before
//! resuming the vCPU. The guest then polls the RX used ring (the "doorbell") before halting
//! again. Writing `QueueNotify` for the TX queue makes the VMM complete responses at once.

/// virtio device id of the request device (outside the range assigned by the virtio spec's
/// registry for real devices we emulate; vendor-specific).
pub const DEVICE_ID: u32 = 0x4b53;
/// Queue index of host -> guest requests.
pub const RX_QUEUE: u16 = 0;
/// Queue index of guest -> host responses.
pub const TX_QUEUE: u16 = 1;
/// Queue size the driver should use.
pub const QUEUE_SIZE: u16 = 64;
/// Largest request (header + payload) the guest must be able to receive.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Largest response payload a guest may send.
pub const MAX_RESPONSE: usize = 4 << 20;

/// Request kinds ([`RequestHeader::kind`]).
pub mod kind {
    /// A request for the workload (payload is workload-specific, e.g. an HTTP request).
    pub const WORKLOAD: u32 = 1;
    /// Kernel control: ping (answered by the kernel itself with an empty payload).
    pub const PING: u32 = 2;
}

/// Header of a request in an RX buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// Host-assigned request id.
    pub id: u64,
    /// A [`kind`] value.
    pub kind: u32,
    /// Payload length in bytes.
    pub len: u32,
}

/// Header of a response in a TX chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Id of the request answered.
    pub id: u64,
    /// Status: 0 = ok, otherwise a workload- or kernel-defined error.
    pub status: u32,
    /// Payload length in bytes.
    pub len: u32,
}

/// Status of a response the kernel sends for a request nobody could take.
pub const STATUS_NO_WORKLOAD: u32 = 0xffff_0001;
