//! virtio-net over the virtio-mmio transport, backed by a tap device (`crate::net`).
//!
//! No offloads: the guest's smoltcp computes checksums and sends frames of at most 1514
//! bytes, so the tap runs without `IFF_VNET_HDR` and the VMM strips or adds the 12-byte
//! `virtio_net_hdr_v1`. TX is drained at the guest's idle exit (the guest does not notify
//! in steady state) or synchronously in a notify exit; every TX
//! frame passes the anti-spoofing filter ([`allowed`]): only the VM's own MAC as source, only
//! its own IPv4 address in IPv4 and ARP. RX frames are moved from the tap into posted buffers
//! whenever the VM exits (idle `hlt`, notifications); a poller thread wakes the idle vCPU when
//! the tap becomes readable, and the guest can ask to be woken after a delay (config write,
//! `abi::net::config::WAKE_US`) since it takes no timer interrupts.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kscope_guest::abi::net::{config, RX_QUEUE, TX_QUEUE, VIRTIO_NET_HDR_LEN};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::virtio_mmio::VirtioDevice;
use crate::net::{NetAttach, Tap};

/// virtio device id of a network device.
pub const DEVICE_ID: u32 = 1;
/// VIRTIO_NET_F_MTU.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;
/// Queue size (RX and TX).
pub const QUEUE_SIZE: u16 = 256;
/// MTU offered to the guest.
pub const MTU: u16 = 1500;
const MAX_FRAME: usize = 1514;

/// Counters of one device.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames sent by the guest to the tap.
    pub tx_frames: AtomicU64,
    /// TX frames dropped by the anti-spoofing filter.
    pub tx_spoofed: AtomicU64,
    /// TX frames dropped because they were malformed or too large.
    pub tx_bad: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounts {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Spoofed frames dropped.
    pub tx_spoofed: u64,
    /// Malformed frames dropped.
    pub tx_bad: u64,
}

impl NetStats {
    /// Current values.
    pub fn snapshot(&self) -> NetCounts {
        NetCounts {
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            tx_spoofed: self.tx_spoofed.load(Ordering::Relaxed),
            tx_bad: self.tx_bad.load(Ordering::Relaxed),
        }
    }
}

/// True if `frame` may leave a VM with `mac` and `ip`: its source MAC is the VM's, and it
/// is IPv4 from the VM's address or ARP about the VM's address (or an ARP probe from
/// 0.0.0.0). Everything else (other ethertypes too) is dropped.
pub fn allowed(frame: &[u8], mac: &[u8; 6], ip: &[u8; 4]) -> bool {
    if frame.len() < 14 || &frame[6..12] != mac {
        return false;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() >= 34 && &frame[26..30] == ip,
        0x0806 => {
            frame.len() >= 42
                && &frame[22..28] == mac
                && (&frame[28..32] == ip || frame[28..32] == [0; 4])
        }
        _ => false,
    }
}

/// The device.
pub struct NetDevice {
    tap: Option<Arc<Tap>>,
    mac: [u8; 6],
    ip: [u8; 4],
    prefix_len: u8,
    stats: Arc<NetStats>,
    wake_at: Arc<Mutex<Option<Instant>>>,
}

impl NetDevice {
    /// A device on `attach`'s tap, or a disconnected one (frames go nowhere).
    pub fn new(attach: Option<&NetAttach>) -> NetDevice {
        NetDevice {
            tap: attach.map(|a| a.tap.clone()),
            mac: attach.map_or([0; 6], |a| a.mac),
            ip: attach.map_or([0; 4], |a| a.ip.octets()),
            prefix_len: attach.map_or(0, |a| a.prefix_len),
            stats: Arc::new(NetStats::default()),
            wake_at: Arc::new(Mutex::new(None)),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// The tap, if connected.
    pub fn tap(&self) -> Option<&Arc<Tap>> {
        self.tap.as_ref()
    }

    /// How long until the guest asked to be woken (`Some(0)`: now); `None`: no deadline.
    /// The deadline is one-shot: it is cleared once it has passed.
    pub fn wake_in(&self) -> Option<Duration> {
        let mut g = self.wake_at.lock().unwrap_or_else(|p| p.into_inner());
        let at = (*g)?;
        let now = Instant::now();
        if at <= now {
            *g = None;
            return Some(Duration::ZERO);
        }
        Some(at - now)
    }

    fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) {
        let Some(tap) = self.tap.clone() else { return };
        let mut buf = [0u8; VIRTIO_NET_HDR_LEN + 2048];
        loop {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return;
            };
            let head = chain.head_index();
            let n = match tap.recv(&mut buf[VIRTIO_NET_HDR_LEN..]) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    q.go_to_previous_position();
                    return;
                }
                Err(e) => {
                    tracing::warn!("virtio-net: tap read: {e}");
                    q.go_to_previous_position();
                    return;
                }
            };
            // virtio_net_hdr_v1: no flags, no GSO, num_buffers = 1.
            buf[..VIRTIO_NET_HDR_LEN].fill(0);
            buf[10] = 1;
            let total = VIRTIO_NET_HDR_LEN + n;
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= total => {
                    w.write_all(&buf[..total]).map(|_| total).unwrap_or(0)
                }
                _ => 0, // buffer too small: the frame is lost, the buffer returned empty
            };
            if q.add_used(mem, head, written as u32).is_err() {
                return;
            }
            if written > 0 {
                self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn drain_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) {
        let mut buf = [0u8; VIRTIO_NET_HDR_LEN + MAX_FRAME + 1];
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match chain.reader(mem) {
                Ok(mut r) => {
                    let n = r.available_bytes().min(buf.len());
                    match r.read_exact(&mut buf[..n]) {
                        Ok(()) => n,
                        Err(_) => 0,
                    }
                }
                Err(_) => 0,
            };
            let frame = &buf[VIRTIO_NET_HDR_LEN.min(len)..len];
            if frame.is_empty() || frame.len() > MAX_FRAME {
                self.stats.tx_bad.fetch_add(1, Ordering::Relaxed);
            } else if !allowed(frame, &self.mac, &self.ip) {
                self.stats.tx_spoofed.fetch_add(1, Ordering::Relaxed);
            } else if let Some(tap) = &self.tap {
                match tap.send(frame) {
                    Ok(()) => {
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!("virtio-net: tap write: {e}"),
                }
            }
            if q.add_used(mem, head, 0).is_err() {
                return;
            }
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_MTU | F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; config::SIZE as usize];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[config::STATUS as usize..][..2].copy_from_slice(&1u16.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[config::MTU as usize..][..2].copy_from_slice(&MTU.to_le_bytes());
        cfg[config::IPV4 as usize..][..4].copy_from_slice(&self.ip);
        cfg[config::PREFIX_LEN as usize] = self.prefix_len;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == config::WAKE_US && data.len() == 4 {
            let us = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            *self.wake_at.lock().unwrap_or_else(|p| p.into_inner()) =
                (us > 0).then(|| Instant::now() + Duration::from_micros(us as u64));
        }
    }

    fn process_queue(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) {
        if index == TX_QUEUE {
            if let Some(q) = queues.get_mut(TX_QUEUE as usize) {
                self.drain_tx(q, mem);
            }
        }
        // Every exit that reaches the device also delivers what the tap has queued.
        if let Some(q) = queues.get_mut(RX_QUEUE as usize) {
            if q.ready() {
                self.fill_rx(q, mem);
            }
        }
    }
}

/// Wakes the VM's idle vCPU when its tap becomes readable (edge-triggered epoll), until the
/// returned guard is dropped.
pub struct TapWatcher {
    stop: std::os::fd::OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TapWatcher {
    /// Watch `tap`; call `wake` on every new frame.
    pub fn start(tap: Arc<Tap>, wake: Box<dyn Fn() + Send>) -> std::io::Result<TapWatcher> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain syscalls; results checked; descriptors owned below.
        let (ep, ev) = unsafe {
            (
                libc::epoll_create1(libc::EPOLL_CLOEXEC),
                libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK),
            )
        };
        if ep < 0 || ev < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both are new descriptors owned by nobody else.
        let (ep, ev) = unsafe { (OwnedFd::from_raw_fd(ep), OwnedFd::from_raw_fd(ev)) };
        for (fd, tag, flags) in [
            (tap.raw_fd(), 1u64, libc::EPOLLIN | libc::EPOLLET),
            (ev.as_raw_fd(), 2u64, libc::EPOLLIN),
        ] {
            let mut e = libc::epoll_event {
                events: flags as u32,
                u64: tag,
            };
            // SAFETY: `ep` and `fd` are open; `e` lives for the call.
            if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut e) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let stop = ev.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("tap-{}", tap.name()))
            .spawn(move || {
                let _keep = (tap, ev);
                let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
                loop {
                    // SAFETY: `ep` is open; `events` has room for 4 entries.
                    let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 4, -1) };
                    if n < 0 {
                        if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                        {
                            continue;
                        }
                        return;
                    }
                    let evs = &events[..n as usize];
                    if evs.iter().any(|e| e.u64 == 2) {
                        return;
                    }
                    wake();
                }
            })?;
        Ok(TapWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TapWatcher {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src_mac: [u8; 6], src_ip: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 34];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&src_mac);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[26..30].copy_from_slice(&src_ip);
        f
    }

    fn arp(sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 42];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&sha);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[22..28].copy_from_slice(&sha);
        f[28..32].copy_from_slice(&spa);
        f
    }

    /// Through the real TX path (virtqueue in guest memory, tap, bridge): the VM's own frame
    /// reaches the bridge, frames with another VM's MAC or IP do not.
    #[test]
    fn spoofed_frames_from_the_guest_never_reach_the_bridge() {
        use crate::devices::virtio_mmio::tests::{handshake, rd, setup_queue, wr};
        use crate::devices::virtio_mmio::{reg, status, MmioTransport, VIRTIO_F_VERSION_1};
        use crate::memory::{GuestMemory, GuestRam};
        use crate::net::{NetAttach, Network};
        use kscope_guest::abi::boot::Identity;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

        // Opens descriptors (taps, the pool's refills): not while the leak test counts them.
        let _fds = crate::lazy::tests::fd_guard();
        let net = Network::get().expect("network namespace");
        let id = Identity {
            mac: [0x52, 0x54, 0, 0x7e, 0, 1, 0, 0],
            ipv4: [10, 0, 254, 1],
            prefix_len: 16,
            hostname: [0; 32],
        };
        let attach = NetAttach::new(net.clone(), &id).expect("tap");
        // A packet socket on the bridge, inside the namespace: what really left the tap.
        let sniffer = net
            .run_in(|| {
                // SAFETY: plain socket(2); checked below.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                        (libc::ETH_P_ARP as u16).to_be() as i32,
                    )
                };
                assert!(
                    fd >= 0,
                    "packet socket: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: `fd` is new and ours.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let name = std::ffi::CString::new(crate::net::BRIDGE).unwrap();
                // SAFETY: a NUL-terminated name.
                let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                // SAFETY: zeroed sockaddr_ll is valid; fields set below.
                let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sa.sll_family = libc::AF_PACKET as u16;
                sa.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
                sa.sll_ifindex = index as i32;
                // SAFETY: `sa` is a valid sockaddr_ll of the given size.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                fd
            })
            .expect("namespace thread");

        let ram = Arc::new(GuestMemory::new(GuestRam::new("net", 4 << 20).unwrap()));
        let mut t = MmioTransport::new(NetDevice::new(Some(&attach)), ram.clone());
        handshake(&mut t, VIRTIO_F_VERSION_1);
        const Q: u64 = 0x10_0000;
        const BUF: u64 = 0x20_0000;
        setup_queue(&mut t, 1, 16, Q);
        let s = rd(&mut t, reg::STATUS);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert!(t.is_active());

        let mac: [u8; 6] = [0x52, 0x54, 0, 0x7e, 0, 1];
        let other_mac: [u8; 6] = [0x52, 0x54, 0, 0x7e, 0, 2];
        let ip = [10, 0, 254, 1];
        let frames = [
            arp(mac, ip),               // own: passes
            arp(other_mac, ip),         // another VM's MAC
            arp(mac, [10, 0, 254, 2]),  // another VM's IP
            ipv4(mac, [10, 0, 254, 2]), // IPv4 from another VM's IP
        ];
        let mem = ram.load();
        for (i, f) in frames.iter().enumerate() {
            let a = BUF + i as u64 * 0x1000;
            let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN];
            buf.extend_from_slice(f);
            mem.write(a, &buf).unwrap();
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&a.to_le_bytes());
            d[8..12].copy_from_slice(&(buf.len() as u32).to_le_bytes());
            mem.write(Q + i as u64 * 16, &d).unwrap();
            mem.write(Q + 0x1000 + 4 + i as u64 * 2, &(i as u16).to_le_bytes())
                .unwrap();
        }
        mem.write(Q + 0x1000 + 2, &(frames.len() as u16).to_le_bytes())
            .unwrap();
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        let k = t.device().stats().snapshot();
        assert_eq!((k.tx_frames, k.tx_spoofed), (1, 3), "{k:?}");

        // Only the own frame appears on the bridge.
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut seen = Vec::new();
        let mut b = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: `b` is writable for its length.
            let n = unsafe { libc::recv(sniffer.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
            if n > 0 {
                let f = &b[..n as usize];
                if f.len() >= 42 && (f[6..12] == mac || f[6..12] == other_mac) {
                    seen.push(f[22..32].to_vec());
                }
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let own: Vec<u8> = mac.iter().chain(ip.iter()).copied().collect();
        assert!(
            seen.contains(&own),
            "the VM's own ARP did not reach the bridge"
        );
        assert!(
            seen.iter().all(|s| *s == own),
            "a spoofed frame reached the bridge: {seen:?}"
        );
        // Let the pool's thread replace the tap taken above before the guard is released, so
        // that it opens no descriptor while another test counts them.
        let full = Instant::now() + Duration::from_secs(10);
        while net.pool_stats().ready < crate::net::POOL_TARGET && Instant::now() < full {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn filter_passes_own_and_drops_spoofed_frames() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let other = [0x52, 0x54, 0, 0, 0, 2];
        let ip = [10, 0, 0, 2];
        assert!(allowed(&ipv4(mac, ip), &mac, &ip));
        assert!(allowed(&arp(mac, ip), &mac, &ip));
        assert!(allowed(&arp(mac, [0; 4]), &mac, &ip));
        assert!(!allowed(&ipv4(other, ip), &mac, &ip), "foreign MAC");
        assert!(!allowed(&ipv4(mac, [10, 0, 0, 3]), &mac, &ip), "foreign IP");
        assert!(
            !allowed(&arp(mac, [10, 0, 0, 3]), &mac, &ip),
            "ARP for a foreign IP"
        );
        let mut a = arp(mac, ip);
        a[22..28].copy_from_slice(&other);
        assert!(!allowed(&a, &mac, &ip), "ARP with a foreign sender MAC");
        let mut v6 = ipv4(mac, ip);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(!allowed(&v6, &mac, &ip), "other ethertypes");
        assert!(!allowed(&[0u8; 10], &mac, &ip), "runt");
    }
}
