//! virtio-mmio (version 2) transport and split virtqueues, polled (no interrupts): a
//! `QueueNotify` write exits to the VMM, which processes the queue before resuming us.

use core::sync::atomic::{fence, Ordering};

use kscope_guest::abi::kinfo::frame_use;

use crate::mm::{frame, va};

const MAGIC: u32 = 0x7472_6976;
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEV_FEATURES: u64 = 0x010;
const R_DEV_FEATURES_SEL: u64 = 0x014;
const R_DRV_FEATURES: u64 = 0x020;
const R_DRV_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC: u64 = 0x080;
const R_QUEUE_DRIVER: u64 = 0x090;
const R_QUEUE_DEVICE: u64 = 0x0a0;
/// Offset of the device-specific configuration space.
pub const R_CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

/// Descriptor continues in `next`.
pub const F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const F_WRITE: u16 = 2;

/// Why a device could not be set up.
#[derive(Debug, Clone, Copy)]
pub enum VirtioError {
    /// Not a virtio-mmio version 2 device of the expected type.
    BadDevice,
    /// The device refused the features (VIRTIO_F_VERSION_1).
    Features,
    /// Queue missing or too small.
    Queue,
    /// Out of memory for rings.
    NoMem,
}

/// A virtio-mmio device register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// The device at kernel virtual address `base`.
    pub const fn new(base: u64) -> Self {
        Mmio { base }
    }

    /// Read a 32-bit register.
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: `base` is the uncached kernel mapping of the device's 4 KiB MMIO page.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    /// Write a 32-bit register.
    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    /// Reset the device, check identity and negotiate VIRTIO_F_VERSION_1 only.
    pub fn begin(&self, device_id: u32) -> Result<(), VirtioError> {
        if self.read(R_MAGIC) != MAGIC || self.read(R_VERSION) != 2 {
            return Err(VirtioError::BadDevice);
        }
        if self.read(R_DEVICE_ID) != device_id {
            return Err(VirtioError::BadDevice);
        }
        self.write(R_STATUS, 0);
        self.write(R_STATUS, S_ACK);
        self.write(R_STATUS, S_ACK | S_DRIVER);
        self.write(R_DEV_FEATURES_SEL, 1);
        let hi = self.read(R_DEV_FEATURES);
        if hi & 1 == 0 {
            self.write(R_STATUS, S_FAILED);
            return Err(VirtioError::Features);
        }
        self.write(R_DRV_FEATURES_SEL, 0);
        self.write(R_DRV_FEATURES, 0);
        self.write(R_DRV_FEATURES_SEL, 1);
        self.write(R_DRV_FEATURES, 1);
        self.write(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if self.read(R_STATUS) & S_FEATURES_OK == 0 {
            self.write(R_STATUS, S_FAILED);
            return Err(VirtioError::Features);
        }
        Ok(())
    }

    /// Mark the driver ready.
    pub fn finish(&self) {
        self.write(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }

    /// Tell the device that queue `q` has new buffers (exits to the VMM).
    pub fn notify(&self, q: u16) {
        self.write(R_QUEUE_NOTIFY, q as u32);
    }
}

/// A split virtqueue in one 4 KiB frame: descriptors at 0, available ring at 1024, used
/// ring at 2048 (room for 64 entries each).
pub struct Queue {
    /// Queue index.
    pub index: u16,
    /// Number of entries.
    pub size: u16,
    base: u64,
    avail_idx: u16,
    last_used: u16,
}

const AVAIL_OFF: u64 = 1024;
const USED_OFF: u64 = 2048;
/// Largest queue this layout supports.
pub const MAX_QUEUE: u16 = 64;

impl Queue {
    /// Set up queue `index` of `dev` with at most `want` entries.
    pub fn new(dev: &Mmio, index: u16, want: u16) -> Result<Queue, VirtioError> {
        dev.write(R_QUEUE_SEL, index as u32);
        if dev.read(R_QUEUE_READY) != 0 {
            return Err(VirtioError::Queue);
        }
        let max = dev.read(R_QUEUE_NUM_MAX);
        if max == 0 {
            return Err(VirtioError::Queue);
        }
        let size = want.min(MAX_QUEUE).min(max.min(0xffff) as u16);
        let phys = frame::alloc_zeroed(frame_use::KERNEL_DATA, 0).ok_or(VirtioError::NoMem)?;
        dev.write(R_QUEUE_NUM, size as u32);
        let put = |off: u64, addr: u64| {
            dev.write(off, addr as u32);
            dev.write(off + 4, (addr >> 32) as u32);
        };
        put(R_QUEUE_DESC, phys);
        put(R_QUEUE_DRIVER, phys + AVAIL_OFF);
        put(R_QUEUE_DEVICE, phys + USED_OFF);
        dev.write(R_QUEUE_READY, 1);
        Ok(Queue {
            index,
            size,
            base: va(phys),
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Fill descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.base + (i as u64 % self.size as u64) * 16;
        // SAFETY: `d` is descriptor `i` of this queue's ring frame.
        unsafe {
            (d as *mut u64).write_volatile(addr);
            ((d + 8) as *mut u32).write_volatile(len);
            ((d + 12) as *mut u16).write_volatile(flags);
            ((d + 14) as *mut u16).write_volatile(next);
        }
    }

    /// Make the chain starting at descriptor `head` available to the device.
    pub fn push_avail(&mut self, head: u16) {
        let a = self.base + AVAIL_OFF;
        let slot = a + 4 + (self.avail_idx % self.size) as u64 * 2;
        // SAFETY: ring slot and index inside this queue's frame.
        unsafe { (slot as *mut u16).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { ((a + 2) as *mut u16).write_volatile(self.avail_idx) };
        fence(Ordering::SeqCst);
    }

    /// Take the next used element `(descriptor head, bytes written)`, if any.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let u = self.base + USED_OFF;
        fence(Ordering::SeqCst);
        // SAFETY: the used index inside this queue's frame (written by the device).
        let idx = unsafe { ((u + 2) as *const u16).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = u + 4 + (self.last_used % self.size) as u64 * 8;
        // SAFETY: used ring element inside this queue's frame.
        let (id, len) = unsafe {
            (
                (e as *const u32).read_volatile(),
                ((e + 4) as *const u32).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// True if the device has returned buffers not yet taken with [`pop_used`](Self::pop_used).
    pub fn has_used(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: the used index inside this queue's frame (written by the device).
        let idx = unsafe { ((self.base + USED_OFF + 2) as *const u16).read_volatile() };
        idx != self.last_used
    }

    /// Wait for the next used element after a notify: the VMM normally completes the request
    /// during the notify exit; otherwise halt (an exit) until it has.
    pub fn wait_used(&mut self) -> (u16, u32) {
        let mut spins = 0u32;
        loop {
            if let Some(e) = self.pop_used() {
                return e;
            }
            spins += 1;
            if spins > 64 {
                crate::arch::hlt();
            }
        }
    }
}
