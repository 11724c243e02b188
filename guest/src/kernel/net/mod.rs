//! The kernel's TCP/IP stack: smoltcp (ARP, IPv4, TCP, UDP) over the virtio-net driver, with
//! fixed socket storage in the kernel image (no allocator), static configuration from the
//! device (the VMM's address plan) and a new identity on every clone generation.
//!
//! The stack is polled: by the scheduler before it picks a process ([`poll`]), after a
//! `send` (so that data leaves at once) and when the guest wakes from `hlt`. Before halting,
//! [`before_halt`] tells the VMM when the stack's next timer (or a `poll` timeout) is due.

pub mod socket;
pub mod virtio_net;

use kscope_guest::abi::boot::Identity;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use crate::arch::KCell;
use crate::virtio::VirtioError;
use virtio_net::{NetConfig, Phy};

/// TCP sockets (connections and listener backlogs together).
pub const MAX_TCP: usize = 24;
/// UDP sockets.
pub const MAX_UDP: usize = 4;
const TCP_RX: usize = 8192;
const TCP_TX: usize = 32768;
const UDP_BUF: usize = 4096;
const UDP_META: usize = 8;

struct Storage {
    sockets: [SocketStorage<'static>; MAX_TCP + MAX_UDP],
    tcp_rx: [[u8; TCP_RX]; MAX_TCP],
    tcp_tx: [[u8; TCP_TX]; MAX_TCP],
    udp_rx: [[u8; UDP_BUF]; MAX_UDP],
    udp_tx: [[u8; UDP_BUF]; MAX_UDP],
    udp_rx_meta: [[udp::PacketMetadata; UDP_META]; MAX_UDP],
    udp_tx_meta: [[udp::PacketMetadata; UDP_META]; MAX_UDP],
}

static STORE: KCell<Storage> = KCell::new(Storage {
    sockets: [SocketStorage::EMPTY; MAX_TCP + MAX_UDP],
    tcp_rx: [[0; TCP_RX]; MAX_TCP],
    tcp_tx: [[0; TCP_TX]; MAX_TCP],
    udp_rx: [[0; UDP_BUF]; MAX_UDP],
    udp_tx: [[0; UDP_BUF]; MAX_UDP],
    udp_rx_meta: [[udp::PacketMetadata::EMPTY; UDP_META]; MAX_UDP],
    udp_tx_meta: [[udp::PacketMetadata::EMPTY; UDP_META]; MAX_UDP],
});

/// The interface and its sockets.
pub struct Net {
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: [SocketHandle; MAX_TCP],
    tcp_used: [bool; MAX_TCP],
    udp: [SocketHandle; MAX_UDP],
    udp_used: [bool; MAX_UDP],
    cfg: NetConfig,
    next_port: u16,
}

static NET: KCell<Option<Net>> = KCell::new(None);

fn net() -> Option<&'static mut Net> {
    NET.get().as_mut()
}

/// Stack time (microseconds since boot).
pub fn now() -> Instant {
    Instant::from_micros((crate::clock_ns() / 1000) as i64)
}

fn cidr(cfg: &NetConfig) -> IpCidr {
    let [a, b, c, d] = cfg.ip;
    IpCidr::new(IpAddress::v4(a, b, c, d), cfg.prefix_len.clamp(1, 32))
}

fn apply_config(iface: &mut Interface, cfg: &NetConfig) {
    iface.set_hardware_addr(HardwareAddress::Ethernet(EthernetAddress(cfg.mac)));
    let c = cidr(cfg);
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        let _ = addrs.push(c);
    });
    iface.routes_mut().remove_default_ipv4_route();
    if cfg.gateway != [0; 4] {
        let [a, b, c, d] = cfg.gateway;
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
}

/// Set up the virtio-net device at `mmio` and the stack on it.
pub fn init(mmio: u64) -> Result<(), VirtioError> {
    let cfg = virtio_net::init(mmio)?;
    let st = STORE.get();
    let mut seed = [0u8; 8];
    crate::rng::fill(&mut seed);
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.mac)));
    config.random_seed = u64::from_le_bytes(seed);
    let mut iface = Interface::new(config, &mut Phy, now());
    apply_config(&mut iface, &cfg);
    let mut sockets = SocketSet::new(&mut st.sockets[..]);
    let mut tcp_h = [SocketHandle::default(); MAX_TCP];
    for ((h, rx), tx) in tcp_h
        .iter_mut()
        .zip(st.tcp_rx.iter_mut())
        .zip(st.tcp_tx.iter_mut())
    {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        // No timer interrupts: ACK at once, send small responses at once.
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        *h = sockets.add(s);
    }
    let mut udp_h = [SocketHandle::default(); MAX_UDP];
    let udp_bufs = st
        .udp_rx_meta
        .iter_mut()
        .zip(st.udp_rx.iter_mut())
        .zip(st.udp_tx_meta.iter_mut().zip(st.udp_tx.iter_mut()));
    for (h, ((rm, rb), (tm, tb))) in udp_h.iter_mut().zip(udp_bufs) {
        let s = udp::Socket::new(
            udp::PacketBuffer::new(&mut rm[..], &mut rb[..]),
            udp::PacketBuffer::new(&mut tm[..], &mut tb[..]),
        );
        *h = sockets.add(s);
    }
    *NET.get() = Some(Net {
        iface,
        sockets,
        tcp: tcp_h,
        tcp_used: [false; MAX_TCP],
        udp: udp_h,
        udp_used: [false; MAX_UDP],
        cfg,
        next_port: 49152,
    });
    let [a, b, c, d] = cfg.ip;
    crate::kprint!(s "kscope: net ", d a as u64, s ".", d b as u64, s ".", d c as u64, s ".", d d as u64,
        s "/", d cfg.prefix_len as u64, s "\n");
    announce(&cfg);
    virtio_net::flush();
    Ok(())
}

/// True when the VM has a network device.
pub fn present() -> bool {
    net().is_some()
}

/// Run the stack once: take received frames, run timers, send what is due.
fn poll_stack(n: &mut Net) {
    let _ = n.iface.poll(now(), &mut Phy, &mut n.sockets);
    virtio_net::flush();
}

/// The scheduler's hook: run the stack, tidy the socket table, wake `poll` waiters.
pub fn poll() {
    let Some(n) = net() else { return };
    poll_stack(n);
    socket::maintain(n);
    socket::wake_waiters(n);
}

/// Before `hlt`: false if frames arrived that the stack has not seen (the VMM may fill RX
/// buffers during any exit, e.g. a TX notification after the stack's last look): then the
/// scheduler must poll again instead of halting. Otherwise ask the VMM to wake us when the
/// stack's next timer or the nearest `poll` timeout is due, and return true.
pub fn before_halt() -> bool {
    let Some(n) = net() else { return true };
    if virtio_net::rx_pending() {
        return false;
    }
    let t = now();
    let ns = crate::clock_ns();
    let stack = n
        .iface
        .poll_delay(t, &n.sockets)
        .map(|d| ns.saturating_add(d.total_micros() * 1000));
    let at = match (stack, socket::next_deadline_ns()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    virtio_net::set_wake(at);
    true
}

/// Broadcast a gratuitous ARP for our address (after boot and on every new identity).
fn announce(cfg: &NetConfig) {
    virtio_net::send_raw(42, |f| {
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&cfg.mac);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        // Ethernet, IPv4, 6, 4, request.
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&cfg.mac);
        f[28..32].copy_from_slice(&cfg.ip);
        f[32..38].fill(0);
        f[38..42].copy_from_slice(&cfg.ip);
    });
}

/// A new clone generation: take the clone's MAC and IP from `id`, drop every connection
/// (silently: the parent still owns them), keep listeners and UDP sockets, announce the new
/// address, and wake `poll` waiters so that SIGCLONE reaches them.
pub fn on_clone(id: &Identity) {
    let Some(n) = net() else { return };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&id.mac[..6]);
    if mac == [0; 6] || id.ipv4 == [0; 4] {
        crate::console::puts("kscope: net: clone identity without an address, keeping ours\n");
    } else {
        n.cfg.mac = mac;
        n.cfg.ip = id.ipv4;
        n.cfg.prefix_len = id.prefix_len.clamp(1, 32) as u8;
        let cfg = n.cfg;
        apply_config(&mut n.iface, &cfg);
    }
    let dropped = socket::drop_connections(n);
    let cfg = n.cfg;
    announce(&cfg);
    virtio_net::flush();
    socket::wake_all(n);
    let [a, b, c, d] = cfg.ip;
    crate::kprint!(s "kscope: net: clone address ", d a as u64, s ".", d b as u64, s ".", d c as u64,
        s ".", d d as u64, s ", dropped ", d dropped, s " connections\n");
}

/// Reset TCP socket `s` without sending anything (its connection belongs to someone else).
fn silent_reset(s: &mut tcp::Socket<'_>) {
    s.abort();
    // `listen` resets the socket's whole state (no RST is queued any more); then close it.
    let _ = s.listen(1);
    s.close();
}

impl Net {
    fn tcp(&mut self, i: usize) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.tcp[i])
    }

    fn udp(&mut self, i: usize) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(self.udp[i])
    }

    fn alloc_tcp(&mut self) -> Option<usize> {
        let i = self.tcp_used.iter().position(|u| !u)?;
        self.tcp_used[i] = true;
        Some(i)
    }

    fn free_tcp(&mut self, i: usize) {
        let s = self.tcp(i);
        if s.state() != tcp::State::Closed {
            silent_reset(s);
        }
        self.tcp_used[i] = false;
    }

    fn alloc_udp(&mut self) -> Option<usize> {
        let i = self.udp_used.iter().position(|u| !u)?;
        self.udp_used[i] = true;
        Some(i)
    }

    fn free_udp(&mut self, i: usize) {
        self.udp(i).close();
        self.udp_used[i] = false;
    }

    fn ephemeral_port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if p >= 65000 { 49152 } else { p + 1 };
        p
    }
}
