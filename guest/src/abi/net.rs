//! Networking ABI: the socket system calls of the guest kernel (TCP and UDP over IPv4, through
//! its smoltcp stack and the virtio-net device) and the kscope extension of the virtio-net
//! configuration space through which the VMM gives a VM its address.
//!
//! Sockets are non-blocking; [`NET_POLL`] is the one call that blocks (like `poll(2)`), on
//! sockets and on the request device ([`REQUEST_FD`]), so that one process can serve many
//! connections and the request device at the same time.

/// `socket(kind) -> fd` with `kind` one of [`SOCK_STREAM`], [`SOCK_DGRAM`].
pub const NET_SOCKET: u64 = 40;
/// `bind(fd, port) -> 0`.
pub const NET_BIND: u64 = 41;
/// `listen(fd, backlog) -> 0` (TCP, bound): up to [`MAX_BACKLOG`] connections are accepted
/// by the kernel before `accept` takes them.
pub const NET_LISTEN: u64 = 42;
/// `accept(fd, *mut SockAddr) -> fd` (TCP, listening); `-EAGAIN` when none is pending.
pub const NET_ACCEPT: u64 = 43;
/// `recv(fd, buf, len) -> bytes` (TCP): 0 at end of stream, `-EAGAIN` when nothing is
/// buffered, `-ECONNRESET` when the connection was reset (also: dropped by a clone).
pub const NET_RECV: u64 = 44;
/// `send(fd, buf, len) -> bytes` (TCP): may send less than `len`; `-EAGAIN` when the send
/// buffer is full, `-EPIPE` when the connection is closed for sending.
pub const NET_SEND: u64 = 45;
/// `sendto(fd, buf, len, *const SockAddr) -> bytes` (UDP, bound).
pub const NET_SENDTO: u64 = 46;
/// `recvfrom(fd, buf, len, *mut SockAddr) -> bytes` (UDP, bound); `-EAGAIN` when empty.
pub const NET_RECVFROM: u64 = 47;
/// `poll(*mut [PollFd], n, timeout_ns) -> ready`: wait until one of the descriptors is ready
/// or `timeout_ns` passed (`u64::MAX`: no timeout; 0: do not block). Returns 0 on timeout
/// and also when a clone generation began (the caller re-checks its state).
pub const NET_POLL: u64 = 48;
/// `net_info(*mut NetInfo) -> 0`; `-ENODEV` without a network device.
pub const NET_INFO: u64 = 49;
/// `connect(fd, *const SockAddr) -> 0` (TCP): starts the handshake; poll for [`POLL_OUT`].
pub const NET_CONNECT: u64 = 50;

/// A TCP socket.
pub const SOCK_STREAM: u64 = 1;
/// A UDP socket.
pub const SOCK_DGRAM: u64 = 2;

/// Pseudo descriptor for [`NET_POLL`]: readable when the request device has a request
/// pending (take it with `recv_request`, which then does not block).
pub const REQUEST_FD: i32 = -2;

/// Readable (data, a connection to accept, end of stream, an error).
pub const POLL_IN: u16 = 1;
/// Writable.
pub const POLL_OUT: u16 = 4;
/// Error (reset connection).
pub const POLL_ERR: u16 = 8;
/// The peer closed (end of stream).
pub const POLL_HUP: u16 = 16;

/// Connections the kernel accepts on a listener before `accept` (larger backlogs are cut).
pub const MAX_BACKLOG: u64 = 8;

/// Errors of the socket calls (returned negated), beside [`crate::abi::syscall::errno`].
pub mod errno {
    /// Try again (non-blocking socket).
    pub const EAGAIN: i64 = 11;
    /// Broken pipe.
    pub const EPIPE: i64 = 32;
    /// Not a socket.
    pub const ENOTSOCK: i64 = 88;
    /// Address in use.
    pub const EADDRINUSE: i64 = 98;
    /// No buffer space (socket table full).
    pub const ENOBUFS: i64 = 105;
    /// Connection reset.
    pub const ECONNRESET: i64 = 104;
    /// Not connected.
    pub const ENOTCONN: i64 = 107;
    /// No such device (no network device).
    pub const ENODEV: i64 = 19;
}

/// One entry of [`NET_POLL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollFd {
    /// Descriptor, or [`REQUEST_FD`].
    pub fd: i32,
    /// Wanted events ([`POLL_IN`], [`POLL_OUT`]).
    pub events: u16,
    /// Events that occurred (set by the kernel).
    pub revents: u16,
}

/// An IPv4 socket address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    /// Address, network byte order.
    pub ip: [u8; 4],
    /// Port.
    pub port: u16,
    /// Reserved.
    pub pad: u16,
}

/// Result of [`NET_INFO`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetInfo {
    /// MAC address.
    pub mac: [u8; 6],
    /// Prefix length.
    pub prefix_len: u8,
    /// Reserved.
    pub pad: u8,
    /// IPv4 address.
    pub ip: [u8; 4],
    /// Frames received and sent by the kernel.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
}

/// virtio-net device id.
pub const VIRTIO_NET_DEVICE_ID: u32 = 1;
/// Length of the virtio-net header with VIRTIO_F_VERSION_1 (`virtio_net_hdr_v1`).
pub const VIRTIO_NET_HDR_LEN: usize = 12;
/// RX queue index.
pub const RX_QUEUE: u16 = 0;
/// TX queue index.
pub const TX_QUEUE: u16 = 1;
/// Largest Ethernet frame (no VLAN tag, no FCS) with MTU 1500.
pub const MAX_FRAME: usize = 1514;

/// The device configuration space of kscope's virtio-net device: the standard fields
/// (`mac`, `status`, `max_virtqueue_pairs`, `mtu`), then kscope's own (IPv4 configuration,
/// written by the VMM; the poll deadline, written by the guest).
pub mod config {
    /// MAC address (6 bytes).
    pub const MAC: u64 = 0;
    /// Link status (le16, 1 = up).
    pub const STATUS: u64 = 6;
    /// MTU (le16).
    pub const MTU: u64 = 10;
    /// IPv4 address (4 bytes, network order).
    pub const IPV4: u64 = 16;
    /// Prefix length (1 byte).
    pub const PREFIX_LEN: u64 = 20;
    /// Gateway IPv4 address (4 bytes; 0.0.0.0 = none).
    pub const GATEWAY: u64 = 24;
    /// Guest write (le32): wake me in this many microseconds even if no frame arrives (the
    /// stack's next timer, a `poll` timeout); 0 = no deadline. The guest takes no timer
    /// interrupts, so an idle guest would otherwise sleep until the next frame.
    pub const WAKE_US: u64 = 32;
    /// Size of the configuration space.
    pub const SIZE: u64 = 36;
}
