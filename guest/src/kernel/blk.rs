//! virtio-blk driver (read only, one request at a time, polled).

use kscope_guest::abi::fs::SECTOR_SIZE;
use kscope_guest::abi::kinfo::frame_use;

use crate::arch::KCell;
use crate::mm::{frame, va};
use crate::virtio::{Mmio, Queue, VirtioError, F_NEXT, F_WRITE, R_CONFIG};

const DEVICE_ID_BLOCK: u32 = 2;
const T_IN: u32 = 0;

struct Blk {
    dev: Mmio,
    q: Queue,
    /// Frame holding the request header (offset 0) and the status byte (offset 64).
    hdr: u64,
    sectors: u64,
}

static BLK: KCell<Option<Blk>> = KCell::new(None);

/// A failed block read.
#[derive(Debug, Clone, Copy)]
pub enum BlkError {
    /// No block device was set up.
    NoDevice,
    /// The request lies beyond the end of the disk.
    OutOfRange,
    /// The device reported an error status.
    Io,
}

/// Set up the block device at kernel virtual address `mmio`.
pub fn init(mmio: u64) -> Result<u64, VirtioError> {
    let dev = Mmio::new(mmio);
    dev.begin(DEVICE_ID_BLOCK)?;
    let q = Queue::new(&dev, 0, 16)?;
    if (q.size as usize) < MAX_PAGES + 2 {
        return Err(VirtioError::Queue);
    }
    dev.finish();
    let sectors = dev.read(R_CONFIG) as u64 | ((dev.read(R_CONFIG + 4) as u64) << 32);
    let hdr = frame::alloc_zeroed(frame_use::KERNEL_DATA, 0).ok_or(VirtioError::NoMem)?;
    *BLK.get() = Some(Blk {
        dev,
        q,
        hdr,
        sectors,
    });
    Ok(sectors * SECTOR_SIZE)
}

/// Read `len` bytes (a multiple of 512) at byte `offset` (sector aligned) into physical
/// memory at `phys` (the device writes there directly).
pub fn read(offset: u64, phys: u64, len: u32) -> Result<(), BlkError> {
    read_pages(offset, &[phys], len)
}

/// Largest number of data buffers in one request.
pub const MAX_PAGES: usize = 8;

/// Read consecutive disk bytes at `offset` (sector aligned) into the buffers `phys`, each
/// `len` bytes (a multiple of 512), in one request (one descriptor per buffer).
pub fn read_pages(offset: u64, phys: &[u64], len: u32) -> Result<(), BlkError> {
    let b = BLK.get().as_mut().ok_or(BlkError::NoDevice)?;
    let n = phys.len().min(MAX_PAGES);
    let total = len as u64 * n as u64;
    let sector = offset / SECTOR_SIZE;
    if n == 0 || sector + total.div_ceil(SECTOR_SIZE) > b.sectors {
        return Err(BlkError::OutOfRange);
    }
    let h = va(b.hdr);
    // SAFETY: the header frame is ours: type, reserved, sector, then the status byte at 64.
    unsafe {
        (h as *mut u32).write_volatile(T_IN);
        ((h + 4) as *mut u32).write_volatile(0);
        ((h + 8) as *mut u64).write_volatile(sector);
        ((h + 64) as *mut u8).write_volatile(0xff);
    }
    b.q.set_desc(0, b.hdr, 16, F_NEXT, 1);
    for (i, &p) in phys[..n].iter().enumerate() {
        let d = i as u16 + 1;
        b.q.set_desc(d, p, len, F_WRITE | F_NEXT, d + 1);
    }
    b.q.set_desc(n as u16 + 1, b.hdr + 64, 1, F_WRITE, 0);
    b.q.push_avail(0);
    b.dev.notify(b.q.index);
    b.q.wait_used();
    // SAFETY: status byte in our header frame, written by the device.
    let status = unsafe { ((h + 64) as *const u8).read_volatile() };
    if status != 0 {
        return Err(BlkError::Io);
    }
    Ok(())
}
