//! Driver of the kscope request device (`abi::request`): RX buffers stay posted (one 16 KiB
//! physically contiguous buffer per descriptor); received requests wait in the kernel (their
//! buffers are not reposted) until a process takes them; responses go out as one descriptor
//! chain (header + payload segments, usually the user's own pages) and complete during the
//! notify exit.

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
/// Largest number of payload segments in one response chain.
pub const MAX_SEGS: usize = QUEUE_SIZE as usize - 1;

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
    hdr: u64,
    rx_dirty: bool,
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

/// Physically contiguous pieces of a response payload.
pub struct Segs {
    /// (physical address, length).
    pub s: [(u64, u32); MAX_SEGS],
    /// Number used.
    pub n: usize,
}

impl Default for Segs {
    fn default() -> Self {
        Self::new()
    }
}

impl Segs {
    /// No segments.
    pub const fn new() -> Self {
        Segs {
            s: [(0, 0); MAX_SEGS],
            n: 0,
        }
    }

    /// Append a piece, merging with the previous one when contiguous; false when full.
    pub fn push(&mut self, phys: u64, len: u32) -> bool {
        if self.n > 0 {
            let (p, l) = self.s[self.n - 1];
            if p + l as u64 == phys && (l as u64 + len as u64) < u32::MAX as u64 {
                self.s[self.n - 1].1 = l + len;
                return true;
            }
        }
        if self.n == MAX_SEGS {
            return false;
        }
        self.s[self.n] = (phys, len);
        self.n += 1;
        true
    }
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
        rx_dirty: false,
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
        self.rx_dirty = true;
    }

    fn send(&mut self, id: u64, status: u32, segs: &Segs, total: u32) {
        let h = ResponseHeader {
            id,
            status,
            len: total,
        };
        crate::klib::copy(
            va(self.hdr),
            as_bytes(&h).as_ptr() as u64,
            core::mem::size_of::<ResponseHeader>(),
        );
        let n = segs.n as u16;
        let hflags = if n > 0 { F_NEXT } else { 0 };
        self.tx.set_desc(
            0,
            self.hdr,
            core::mem::size_of::<ResponseHeader>() as u32,
            hflags,
            1,
        );
        for (k, &(p, l)) in segs.s[..segs.n].iter().enumerate() {
            let k = k as u16 + 1;
            let f = if k < n { F_NEXT } else { 0 };
            self.tx.set_desc(k, p, l, f, k + 1);
        }
        self.tx.push_avail(0);
        self.dev.notify(TX_QUEUE);
        self.tx.wait_used();
    }
}

/// Collect newly received requests; PINGs (and requests nobody can take, when
/// `has_receiver` is false) are answered right here. Returns the number now pending.
pub fn poll(has_receiver: bool) -> usize {
    let Some(d) = dev() else { return 0 };
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
            d.send(h.id, status, &Segs::new(), 0);
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

/// Send a response for `id` with payload pieces `segs` (`total` bytes).
pub fn respond(id: u64, status: u32, segs: &Segs, total: u32) {
    if let Some(d) = dev() {
        d.send(id, status, segs, total);
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

/// Tell the device about reposted RX buffers (before halting).
pub fn flush() {
    if let Some(d) = dev() {
        if d.rx_dirty {
            d.rx_dirty = false;
            d.dev.notify(RX_QUEUE);
        }
    }
}
