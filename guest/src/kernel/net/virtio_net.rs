//! virtio-net driver (polled, like every kscope device) and smoltcp's `Device` over it.
//!
//! RX: [`RX_BUFS`] buffers of 2 KiB stay posted; the VMM fills them from the VM's tap device
//! whenever the guest exits (`hlt`, a queue notification). A used buffer is handed to smoltcp
//! and reposted right away (no notification needed: the VMM reads the available ring at
//! its next exit). TX: a frame is built in one of [`TX_BUFS`] buffers behind a zeroed
//! virtio-net header and left on the ring without a notification: the VMM drains it at the
//! guest's next exit (the `hlt` of the idle guest, which follows soon), so that a request
//! costs no MMIO exit (47 us each in native mode); only a full ring forces a notification,
//! which the VMM completes synchronously.

use kscope_guest::abi::kinfo::frame_use;
use kscope_guest::abi::net::{config, MAX_FRAME, RX_QUEUE, TX_QUEUE, VIRTIO_NET_HDR_LEN};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::arch::KCell;
use crate::mm::{frame, va};
use crate::virtio::{Mmio, Queue, VirtioError, F_WRITE, R_CONFIG};

/// Posted receive buffers.
pub const RX_BUFS: usize = 32;
/// Transmit buffers.
pub const TX_BUFS: usize = 32;
const BUF: u64 = 2048;

/// The device's static IPv4 configuration (kscope's config-space extension).
#[derive(Clone, Copy, Default)]
pub struct NetConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length.
    pub prefix_len: u8,
    /// Gateway (0.0.0.0: none).
    pub gateway: [u8; 4],
}

struct NetDev {
    dev: Mmio,
    rx: Queue,
    tx: Queue,
    rx_phys: u64,
    tx_phys: u64,
    tx_free: [u16; TX_BUFS],
    n_free: usize,
    tx_unnotified: usize,
    rx_frames: u64,
    tx_frames: u64,
    wake_at_ns: u64,
}

static DEV: KCell<Option<NetDev>> = KCell::new(None);
/// Where a frame goes that cannot be sent (no stack space for it in the kernel).
static SCRATCH: KCell<[u8; MAX_FRAME]> = KCell::new([0; MAX_FRAME]);

fn dev() -> Option<&'static mut NetDev> {
    DEV.get().as_mut()
}

/// Set up the device at kernel virtual address `mmio`; returns its configuration.
pub fn init(mmio: u64) -> Result<NetConfig, VirtioError> {
    let dev = Mmio::new(mmio);
    dev.begin(kscope_guest::abi::net::VIRTIO_NET_DEVICE_ID)?;
    let mut rx = Queue::new(&dev, RX_QUEUE, RX_BUFS as u16)?;
    let tx = Queue::new(&dev, TX_QUEUE, TX_BUFS as u16)?;
    dev.finish();
    let pages = |n: usize| (n as u64 * BUF).div_ceil(kscope_guest::abi::layout::PAGE_SIZE);
    let rx_phys =
        frame::alloc_contig(pages(RX_BUFS), frame_use::KERNEL_DATA, 0).ok_or(VirtioError::NoMem)?;
    let tx_phys =
        frame::alloc_contig(pages(TX_BUFS), frame_use::KERNEL_DATA, 0).ok_or(VirtioError::NoMem)?;
    let nrx = (rx.size as usize).min(RX_BUFS);
    for i in 0..nrx {
        rx.set_desc(i as u16, rx_phys + i as u64 * BUF, BUF as u32, F_WRITE, 0);
        rx.push_avail(i as u16);
    }
    let ntx = (tx.size as usize).min(TX_BUFS);
    let mut tx_free = [0u16; TX_BUFS];
    for (i, f) in tx_free.iter_mut().enumerate().take(ntx) {
        *f = i as u16;
    }
    let mut cfg = NetConfig::default();
    let rd = |off: u64| dev.read(R_CONFIG + off);
    let m0 = rd(config::MAC).to_le_bytes();
    let m1 = rd(config::MAC + 4).to_le_bytes();
    cfg.mac = [m0[0], m0[1], m0[2], m0[3], m1[0], m1[1]];
    cfg.ip = rd(config::IPV4).to_le_bytes();
    cfg.prefix_len = rd(config::PREFIX_LEN) as u8;
    cfg.gateway = rd(config::GATEWAY).to_le_bytes();
    *DEV.get() = Some(NetDev {
        dev,
        rx,
        tx,
        rx_phys,
        tx_phys,
        tx_free,
        n_free: ntx,
        tx_unnotified: 0,
        rx_frames: 0,
        tx_frames: 0,
        wake_at_ns: 0,
    });
    Ok(cfg)
}

/// True once [`init`] succeeded.
pub fn present() -> bool {
    dev().is_some()
}

/// (frames received, frames sent).
pub fn counters() -> (u64, u64) {
    dev().map_or((0, 0), |d| (d.rx_frames, d.tx_frames))
}

impl NetDev {
    /// Take back the TX buffers the device has consumed.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            if (id as usize) < TX_BUFS && self.n_free < TX_BUFS {
                self.tx_free[self.n_free] = id;
                self.n_free += 1;
            }
        }
    }

    /// Notify the device (an exit; it completes the frames synchronously) and reclaim.
    fn kick(&mut self) {
        if self.tx_unnotified > 0 {
            self.tx_unnotified = 0;
            self.dev.notify(TX_QUEUE);
        }
        self.reclaim();
    }

    /// A free TX buffer; notifies (the VMM completes synchronously) when none is left.
    fn tx_slot(&mut self) -> Option<u16> {
        if self.n_free == 0 {
            self.reclaim();
        }
        if self.n_free == 0 {
            self.kick();
        }
        if self.n_free == 0 {
            return None;
        }
        self.n_free -= 1;
        Some(self.tx_free[self.n_free])
    }

    fn send(&mut self, slot: u16, len: usize) {
        let phys = self.tx_phys + slot as u64 * BUF;
        self.tx
            .set_desc(slot, phys, (VIRTIO_NET_HDR_LEN + len) as u32, 0, 0);
        self.tx.push_avail(slot);
        self.tx_frames += 1;
        self.tx_unnotified += 1;
    }
}

/// Notify the device about queued TX frames now (one exit, only if there are any).
pub fn kick() {
    if let Some(d) = dev() {
        d.kick();
    }
}

/// True if received frames wait in the used ring.
pub fn rx_pending() -> bool {
    dev().is_some_and(|d| d.rx.has_used())
}

/// Reclaim the TX buffers the device has consumed.
///
/// Exit-free: frames stay on the TX ring, which the VMM drains at the guest's next exit (the
/// `hlt` of an idle guest follows soon); only a full ring forces a notification.
pub fn flush() {
    if let Some(d) = dev() {
        d.reclaim();
    }
}

/// Ask the VMM to wake the halted guest by clock time `at_ns` (`None`: only for frames). One
/// configuration write (an exit), skipped while an earlier wake-up is already pending (an
/// early wake-up only costs a poll): TCP's retransmission timer would otherwise cost an exit
/// on every halt.
pub fn set_wake(at_ns: Option<u64>) {
    let Some(d) = dev() else { return };
    let Some(at) = at_ns else { return };
    let now = crate::clock_ns();
    if d.wake_at_ns > now && d.wake_at_ns <= at {
        return;
    }
    let us = ((at.saturating_sub(now)) / 1000).clamp(1, u32::MAX as u64) as u32;
    d.wake_at_ns = now + us as u64 * 1000;
    d.dev.write(R_CONFIG + config::WAKE_US, us);
}

/// Send one raw Ethernet frame built by `f` into a buffer of `len` bytes (e.g. a gratuitous
/// ARP); false when no buffer is free.
pub fn send_raw(len: usize, f: impl FnOnce(&mut [u8])) -> bool {
    let Some(d) = dev() else { return false };
    let Some(slot) = d.tx_slot() else {
        return false;
    };
    let buf = frame_buf(d.tx_phys, slot);
    buf[..VIRTIO_NET_HDR_LEN].fill(0);
    let len = len.min(MAX_FRAME);
    f(&mut buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len]);
    d.send(slot, len);
    true
}

fn frame_buf(base_phys: u64, slot: u16) -> &'static mut [u8] {
    // SAFETY: buffer `slot` of a driver-owned, physically contiguous buffer area (2 KiB each,
    // direct-mapped); the device only reads (TX) or writes (RX) it while it is on a ring,
    // never while the kernel holds this slice.
    unsafe {
        core::slice::from_raw_parts_mut(va(base_phys + slot as u64 * BUF) as *mut u8, BUF as usize)
    }
}

/// smoltcp's view of the device (the driver state is the kernel global).
pub struct Phy;

/// A received frame (RX descriptor `id`, `len` bytes with the header).
pub struct RxTok {
    id: u16,
    len: u32,
}

/// Permission to send one frame.
pub struct TxTok;

impl phy::RxToken for RxTok {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let d = dev().expect("RX token without a device");
        let buf = frame_buf(d.rx_phys, self.id);
        let end = (self.len as usize).clamp(VIRTIO_NET_HDR_LEN, BUF as usize);
        let r = f(&buf[VIRTIO_NET_HDR_LEN..end]);
        d.rx.set_desc(
            self.id,
            d.rx_phys + self.id as u64 * BUF,
            BUF as u32,
            F_WRITE,
            0,
        );
        d.rx.push_avail(self.id);
        r
    }
}

impl phy::TxToken for TxTok {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let d = dev().expect("TX token without a device");
        match d.tx_slot() {
            Some(slot) => {
                let buf = frame_buf(d.tx_phys, slot);
                buf[..VIRTIO_NET_HDR_LEN].fill(0);
                let len = len.min(MAX_FRAME);
                let r = f(&mut buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len]);
                d.send(slot, len);
                r
            }
            None => {
                // Every buffer is on the ring even after a notification: drop the frame
                // (TCP retransmits), as a full NIC queue would.
                f(&mut SCRATCH.get()[..len.min(MAX_FRAME)])
            }
        }
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok, TxTok)> {
        let d = dev()?;
        let (id, len) = d.rx.pop_used()?;
        if id as usize >= RX_BUFS {
            return None;
        }
        d.rx_frames += 1;
        Some((RxTok { id, len }, TxTok))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok> {
        dev().map(|_| TxTok)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MAX_FRAME;
        c.max_burst_size = Some(TX_BUFS);
        c
    }
}
