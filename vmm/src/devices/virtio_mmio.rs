//! The virtio-mmio transport, version 2 (virtio 1.x spec, section 4.2.2), with split
//! virtqueues from `virtio-queue`.
//!
//! `QueueNotify` is handled synchronously on the vCPU thread that wrote it: the device
//! processes the queue during the MMIO exit. The guest takes no interrupts, so
//! `InterruptStatus` is only informative.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::bus::BusDevice;
use crate::memory::GuestMemory;

/// Register offsets (virtio spec 4.2.2).
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Vendor id reported by kscope devices ("KSCP").
pub const VENDOR_ID: u32 = 0x5043_534b;

/// Device status bits.
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// virtio device id.
    fn device_id(&self) -> u32;
    /// Offered feature bits (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index`; process it. `queues` are the device's queues.
    fn process_queue(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap);
    /// The driver wrote device configuration space at `offset` (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Saved state of one split virtqueue (serializable mirror of `virtio_queue::QueueState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Size chosen by the driver.
    pub size: u16,
    /// Queue ready.
    pub ready: bool,
    /// GPA of the descriptor table.
    pub desc_table: u64,
    /// GPA of the available ring.
    pub avail_ring: u64,
    /// GPA of the used ring.
    pub used_ring: u64,
}

/// Saved state of a virtio-mmio transport: registers and queues (the device behind it is
/// stateless or restores itself).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// Accepted driver features.
    pub driver_features: u64,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
}

/// The virtio-mmio transport of one device.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    memory: Arc<GuestMemory>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    notifies: u64,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wrap `device`; queues access guest RAM through `memory`.
    pub fn new(device: D, memory: Arc<GuestMemory>) -> MmioTransport<D> {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            memory,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            notifies: 0,
        }
    }

    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).expect("queue max size is a power of two <= 32768"))
            .collect()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Status register value.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Number of queue notifications received.
    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    /// True once the driver set DRIVER_OK and the device does not need a reset.
    pub fn is_active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Capture the transport's registers and queue state (the VM must be paused).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        max_size: s.max_size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
        }
    }

    /// Restore a state captured by [`save_state`](Self::save_state) from the same kind of
    /// device. Fails (changing nothing) if the queue layout does not match the device's.
    pub fn restore_state(&mut self, st: &TransportState) -> Result<(), String> {
        let maxes = self.device.queue_max_sizes();
        if st.queues.len() != maxes.len()
            || st.queues.iter().zip(maxes).any(|(q, &m)| q.max_size != m)
        {
            return Err(format!(
                "saved transport has queues {:?}, the device {:?}",
                st.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
                maxes
            ));
        }
        let queues = st
            .queues
            .iter()
            .map(|q| {
                Queue::try_from(QueueState {
                    max_size: q.max_size,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .map_err(|e| format!("saved queue state is invalid: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.status = st.status;
        self.device_features_sel = st.device_features_sel;
        self.driver_features = st.driver_features;
        self.driver_features_sel = st.driver_features_sel;
        self.queue_sel = st.queue_sel;
        self.interrupt_status = st.interrupt_status;
        self.config_generation = st.config_generation;
        Ok(())
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// Let the device process queue `index` outside a guest notification (e.g. on HLT).
    pub fn kick_queue(&mut self, index: u16) {
        if !self.is_active() || index as usize >= self.queues.len() {
            return;
        }
        if !self.queues[index as usize].ready() {
            return;
        }
        let ram = self.memory.load();
        self.device
            .process_queue(index, &mut self.queues, ram.mem());
        self.interrupt_status |= 1;
    }

    fn reset(&mut self) {
        self.queues = Self::fresh_queues(&self.device);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK is only accepted for a subset of the offered features with VERSION_1.
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features() == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        if v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            let ram = self.memory.load();
            let bad = self
                .queues
                .iter()
                .any(|q| q.ready() && !q.is_valid(ram.mem()));
            if bad || v & status::FEATURES_OK == 0 {
                v |= status::DEVICE_NEEDS_RESET;
            }
        }
        self.status = v;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue configuration is only allowed before DRIVER_OK.
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if configurable => {
                let hi = offset == reg::QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address((!hi).then_some(v), hi.then_some(v));
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if configurable => {
                let hi = offset == reg::QUEUE_DRIVER_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address((!hi).then_some(v), hi.then_some(v));
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if configurable => {
                let hi = offset == reg::QUEUE_DEVICE_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address((!hi).then_some(v), hi.then_some(v));
                }
            }
            reg::QUEUE_NOTIFY => {
                self.notifies += 1;
                // virtio-mmio without VIRTIO_F_NOTIFICATION_DATA: the value is the queue index.
                self.kick_queue(v as u16);
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.write_status(v),
            _ => tracing::debug!("virtio-mmio: ignored write of {v:#x} at {offset:#x}"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_reg(offset)
        } else {
            0
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::GuestRam;

    /// A device that counts notifications per queue.
    pub(crate) struct Counter {
        pub hits: Vec<u32>,
        resets: u32,
    }

    impl VirtioDevice for Counter {
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn process_queue(&mut self, index: u16, _q: &mut [Queue], _m: &GuestMemoryMmap) {
            self.hits[index as usize] += 1;
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    pub(crate) fn rd(t: &mut impl BusDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn wr(t: &mut impl BusDevice, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Configure queue `i` of size `n` at `base` (desc), `base+0x1000` (avail),
    /// `base+0x2000` (used).
    pub(crate) fn setup_queue(t: &mut impl BusDevice, i: u32, n: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, i);
        wr(t, reg::QUEUE_NUM, n);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    /// Drive the status handshake up to DRIVER_OK with `features` accepted.
    pub(crate) fn handshake(t: &mut impl BusDevice, features: u64) -> u32 {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, reg::STATUS, s);
        rd(t, reg::STATUS)
    }

    fn transport() -> MmioTransport<Counter> {
        let mem = Arc::new(GuestMemory::new(GuestRam::new("mmio", 4 << 20).unwrap()));
        MmioTransport::new(
            Counter {
                hits: vec![0, 0],
                resets: 0,
            },
            mem,
        )
    }

    #[test]
    fn identification_registers() {
        let mut t = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 5);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1); // VERSION_1
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
        let mut c = [0u8; 2];
        t.read(reg::CONFIG + 4, &mut c);
        assert_eq!(c, [4, 5]);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn features_ok_requires_version_1_and_a_subset() {
        let mut t = transport();
        let s = handshake(&mut t, 1 << 5);
        assert_eq!(s & status::FEATURES_OK, 0, "no VERSION_1 => refused");
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.device().resets, 1);
        let s = handshake(&mut t, VIRTIO_F_VERSION_1 | 1 << 6);
        assert_eq!(s & status::FEATURES_OK, 0, "unoffered feature => refused");
        wr(&mut t, reg::STATUS, 0);
        let s = handshake(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
        assert_ne!(s & status::FEATURES_OK, 0);
    }

    #[test]
    fn notify_reaches_the_device_only_when_active_and_ready() {
        let mut t = transport();
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.device().hits, vec![0, 0]);
        handshake(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x10_0000);
        let s = rd(&mut t, reg::STATUS);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert!(t.is_active());
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        wr(&mut t, reg::QUEUE_NOTIFY, 1); // queue 1 not ready
        assert_eq!(t.device().hits, vec![1, 0]);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Queue configuration is frozen after DRIVER_OK.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(t.notifies(), 3);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let mut t = transport();
        handshake(&mut t, VIRTIO_F_VERSION_1);
        // Rings beyond the 4 MiB of RAM.
        setup_queue(&mut t, 0, 16, 0x1000_0000);
        let s = rd(&mut t, reg::STATUS);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_active());
    }
}
