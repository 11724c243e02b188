//! Driver of the kscope request device (`abi::request`): RX buffers stay posted (one 16 KiB
//! physically contiguous buffer per descriptor); received requests wait in the kernel (their
//! buffers are not reposted) until a process takes them; each response goes out as a
//! two-descriptor chain (header + a kernel copy of the payload) in one of [`TX_SLOTS`] slots.
//!
//! Built for native-mode costs, where an exit to the VMM costs 37-47 us: the driver never
//! notifies the device in steady state. The VMM reads both rings whenever the vCPU exits
//! anyway (the `hlt` of an idle kernel), so responses, reposted RX buffers and new requests
//! all travel with that one exit; completed responses are reaped on the next poll. Only a
//! full TX ring forces a notify.

use kscope_guest::abi::kinfo::frame_use;
use kscope_guest::abi::layout::PAGE_SIZE;
use kscope_guest::abi::request::{
    kind, RequestHeader, ResponseHeader, DEVICE_ID, MAX_REQUEST, QUEUE_SIZE, RX_QUEUE,
    STATUS_NO_WORKLOAD, TX_QUEUE,
};
use kscope_guest::abi::{as_bytes, from_bytes};

use crate::arch::KCell;
use crate::mm::{frame, va};
use crate::virtio::{Mmio, Queue, VirtioError, F_NEXT, F_WRITE};

const RX_BUFS: usize = 16;
const MAX_INFLIGHT: usize = 64;
/// Responses in the TX ring at once (two descriptors each: header, payload).
pub const TX_SLOTS: usize = QUEUE_SIZE as usize / 2;
/// Bytes of one response header in the header page.
const HDR_SIZE: u64 = core::mem::size_of::<ResponseHeader>() as u64;

struct ReqDev {
    dev: Mmio,
    rx: Queue,
    tx: Queue,
    nbufs: usize,
    bufs: [u64; RX_BUFS],
    lens: [u32; RX_BUFS],
    pending: [u16; RX_BUFS],
    p_head: usize,
    p_len: usize,
    inflight: [u64; MAX_INFLIGHT],
    n_inflight: usize,
    /// Page of TX headers, one per slot.
    hdr: u64,
    /// Payload buffer of each busy TX slot: (physical address, pages); pages 0 = free slot.
    tx_bufs: [(u64, u64); TX_SLOTS],
    tx_busy: usize,
}

static REQ: KCell<Option<ReqDev>> = KCell::new(None);

/// A received request waiting in the kernel.
#[derive(Clone, Copy)]
pub struct Pending {
    /// RX buffer index.
    pub buf: usize,
    /// Header.
    pub hdr: RequestHeader,
    /// Kernel address of the payload.
    pub payload: u64,
    /// Payload bytes present in the buffer.
    pub len: usize,
}

/// Set up the request device at kernel virtual address `mmio`.
pub fn init(mmio: u64) -> Result<(), VirtioError> {
    let dev = Mmio::new(mmio);
    dev.begin(DEVICE_ID)?;
    let mut rx = Queue::new(&dev, RX_QUEUE, QUEUE_SIZE)?;
    let tx = Queue::new(&dev, TX_QUEUE, QUEUE_SIZE)?;
    dev.finish();
    let hdr = frame::alloc_zeroed(frame_use::KERNEL_DATA, 0).ok_or(VirtioError::NoMem)?;
    let nbufs = RX_BUFS.min(rx.size as usize);
    let mut bufs = [0u64; RX_BUFS];
    let pages = (MAX_REQUEST as u64).div_ceil(PAGE_SIZE);
    for (i, b) in bufs.iter_mut().enumerate().take(nbufs) {
        *b = frame::alloc_contig(pages, frame_use::KERNEL_DATA, 0).ok_or(VirtioError::NoMem)?;
        rx.set_desc(i as u16, *b, MAX_REQUEST as u32, F_WRITE, 0);
        rx.push_avail(i as u16);
    }
    dev.notify(RX_QUEUE);
    *REQ.get() = Some(ReqDev {
        dev,
        rx,
        tx,
        nbufs,
        bufs,
        lens: [0; RX_BUFS],
        pending: [0; RX_BUFS],
        p_head: 0,
        p_len: 0,
        inflight: [0; MAX_INFLIGHT],
        n_inflight: 0,
        hdr,
        tx_bufs: [(0, 0); TX_SLOTS],
        tx_busy: 0,
    });
    Ok(())
}

fn dev() -> Option<&'static mut ReqDev> {
    REQ.get().as_mut()
}

impl ReqDev {
    fn header(&self, i: usize) -> RequestHeader {
        // SAFETY: RX buffer `i` is MAX_REQUEST bytes of kernel memory.
        let b = unsafe { core::slice::from_raw_parts(va(self.bufs[i]) as *const u8, 16) };
        from_bytes(b).unwrap_or_default()
    }

    fn repost(&mut self, i: usize) {
        self.rx.push_avail(i as u16);
    }

    /// Free the buffers of responses the device has consumed.
    fn reap(&mut self) {
        while let Some((head, _)) = self.tx.pop_used() {
            let k = head as usize / 2;
            if k >= TX_SLOTS {
                continue;
            }
            let (phys, pages) = core::mem::replace(&mut self.tx_bufs[k], (0, 0));
            if pages == 0 {
                continue;
            }
            if phys != 0 {
                for p in 0..pages {
                    frame::free(phys + p * PAGE_SIZE);
                }
            }
            self.tx_busy -= 1;
        }
    }

    /// A free TX slot, forcing the device to consume the ring if it is full.
    fn free_slot(&mut self) -> usize {
        loop {
            self.reap();
            if let Some(k) = self.tx_bufs.iter().position(|b| b.1 == 0) {
                return k;
            }
            // Full: the one notify of the steady state (completes during the exit).
            self.dev.notify(TX_QUEUE);
        }
    }

    /// Queue a response whose payload is `payload` = (physical address, length) in `pages`
    /// pages the driver now owns (freed when the device has read them).
    fn send(&mut self, id: u64, status: u32, payload: (u64, u32), pages: u64) {
        let k = self.free_slot();
        let h = ResponseHeader {
            id,
            status,
            len: payload.1,
        };
        let hdr = self.hdr + k as u64 * HDR_SIZE;
        crate::klib::copy(va(hdr), as_bytes(&h).as_ptr() as u64, HDR_SIZE as usize);
        let d = 2 * k as u16;
        if payload.1 > 0 {
            self.tx.set_desc(d, hdr, HDR_SIZE as u32, F_NEXT, d + 1);
            self.tx.set_desc(d + 1, payload.0, payload.1, 0, 0);
        } else {
            self.tx.set_desc(d, hdr, HDR_SIZE as u32, 0, 0);
        }
        // A slot is busy while `pages` != 0; header-only responses own no buffer.
        self.tx_bufs[k] = (if pages == 0 { 0 } else { payload.0 }, pages.max(1));
        self.tx_busy += 1;
        self.tx.push_avail(d);
    }
}

/// Collect newly received requests; PINGs (and requests nobody can take, when
/// `has_receiver` is false) are answered right here. Returns the number now pending.
pub fn poll(has_receiver: bool) -> usize {
    let Some(d) = dev() else { return 0 };
    d.reap();
    while let Some((id, len)) = d.rx.pop_used() {
        let i = id as usize;
        if i >= d.nbufs {
            continue;
        }
        d.lens[i] = len;
        let h = d.header(i);
        if h.kind == kind::PING || h.kind != kind::WORKLOAD || !has_receiver {
            let status = if h.kind == kind::PING {
                0
            } else {
                STATUS_NO_WORKLOAD
            };
            d.send(h.id, status, (0, 0), 0);
            d.repost(i);
            continue;
        }
        let slot = (d.p_head + d.p_len) % RX_BUFS;
        d.pending[slot] = i as u16;
        d.p_len += 1;
    }
    d.p_len
}

/// The oldest pending request, if any (stays pending until `consume`).
pub fn peek() -> Option<Pending> {
    let d = dev()?;
    if d.p_len == 0 {
        return None;
    }
    let i = d.pending[d.p_head] as usize;
    let hdr = d.header(i);
    let avail = (d.lens[i] as usize)
        .saturating_sub(16)
        .min(MAX_REQUEST - 16);
    Some(Pending {
        buf: i,
        hdr,
        payload: va(d.bufs[i]) + 16,
        len: avail.min(hdr.len as usize),
    })
}

/// Remove the oldest pending request: its buffer is reposted; with `handed_out` its id
/// becomes in flight (a response is expected).
pub fn consume(handed_out: bool) {
    let Some(d) = dev() else { return };
    if d.p_len == 0 {
        return;
    }
    let i = d.pending[d.p_head] as usize;
    let id = d.header(i).id;
    d.p_head = (d.p_head + 1) % RX_BUFS;
    d.p_len -= 1;
    d.repost(i);
    if handed_out {
        if d.n_inflight == MAX_INFLIGHT {
            d.inflight.copy_within(1.., 0);
            d.n_inflight -= 1;
        }
        d.inflight[d.n_inflight] = id;
        d.n_inflight += 1;
    }
}

/// Forget request `id` if it is in flight; false if it is not (e.g. dropped by a clone).
pub fn take_inflight(id: u64) -> bool {
    let Some(d) = dev() else { return false };
    match d.inflight[..d.n_inflight].iter().position(|&x| x == id) {
        Some(k) => {
            d.inflight.copy_within(k + 1..d.n_inflight, k);
            d.n_inflight -= 1;
            true
        }
        None => false,
    }
}

/// Send a response for `id` whose payload (`len` bytes) the caller copied into `pages`
/// contiguous frames at `phys`; the driver owns and frees them.
pub fn respond(id: u64, status: u32, phys: u64, len: u32, pages: u64) {
    match dev() {
        Some(d) => d.send(id, status, (phys, len), pages),
        None => {
            for p in 0..pages {
                frame::free(phys + p * PAGE_SIZE);
            }
        }
    }
}

/// Drop every request in flight and every pending one (on clone); returns how many.
pub fn drop_all() -> u64 {
    let Some(d) = dev() else { return 0 };
    let mut n = d.n_inflight as u64;
    d.n_inflight = 0;
    while d.p_len > 0 {
        let i = d.pending[d.p_head] as usize;
        d.p_head = (d.p_head + 1) % RX_BUFS;
        d.p_len -= 1;
        d.repost(i);
        n += 1;
    }
    n
}

/// Drop only the requests in flight (the `drop_inflight` system call).
pub fn drop_inflight() -> u64 {
    let Some(d) = dev() else { return 0 };
    let n = d.n_inflight as u64;
    d.n_inflight = 0;
    n
}

/// Responses queued and not yet consumed by the device.
pub fn tx_pending() -> usize {
    dev().map_or(0, |d| d.tx_busy)
}
