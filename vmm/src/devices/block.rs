//! A read-only virtio-blk device over an in-memory disk image (`Arc<[u8]>`).
//!
//! Supports `VIRTIO_BLK_T_IN` and `VIRTIO_BLK_T_GET_ID`; writes and out-of-range reads
//! complete with `VIRTIO_BLK_S_IOERR`, other request types with `VIRTIO_BLK_S_UNSUPP`.

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::virtio_mmio::VirtioDevice;

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// VIRTIO_BLK_F_RO.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Sector size.
pub const SECTOR: u64 = 512;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Read.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Get device id string.
pub const T_GET_ID: u32 = 8;
/// Success.
pub const S_OK: u8 = 0;
/// I/O error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Length of the id string of GET_ID.
pub const ID_LEN: usize = 20;

/// The block device.
pub struct BlockDevice {
    disk: Arc<[u8]>,
    id: [u8; ID_LEN],
    /// Requests completed (all statuses).
    pub requests: u64,
}

impl BlockDevice {
    /// A read-only disk over `disk` (length must be a multiple of 512) with serial `id`.
    pub fn new(disk: Arc<[u8]>, id: &str) -> BlockDevice {
        let mut idb = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        BlockDevice {
            disk,
            id: idb,
            requests: 0,
        }
    }

    /// Handle one request chain; returns the number of bytes written to the guest.
    fn handle(&self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(_) => return 0,
        };
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(_) => return 0,
        };
        let avail = writer.available_bytes();
        if avail == 0 {
            return 0; // no room for a status byte: drop the request
        }
        let mut status_w = match writer.split_at(avail - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let mut hdr = [0u8; 16];
        let status = if reader.read_exact(&mut hdr).is_err() {
            S_IOERR
        } else {
            let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
            match kind {
                T_IN => {
                    let len = avail - 1;
                    let range = sector
                        .checked_mul(SECTOR)
                        .and_then(|o| usize::try_from(o).ok())
                        .and_then(|o| Some(o..o.checked_add(len)?))
                        .filter(|r| r.end <= self.disk.len());
                    match range {
                        Some(r) if writer.write_all(&self.disk[r.clone()]).is_ok() => S_OK,
                        _ => S_IOERR,
                    }
                }
                T_GET_ID => {
                    let n = (avail - 1).min(ID_LEN);
                    if writer.write_all(&self.id[..n]).is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                T_OUT => S_IOERR,
                _ => S_UNSUPP,
            }
        };
        let _ = status_w.write_all(&[status]);
        (writer.bytes_written() + status_w.bytes_written()) as u32
    }
}

impl VirtioDevice for BlockDevice {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_RO
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64, in sectors) at 0, then fields we do not
        // offer (zero).
        let mut cfg = [0u8; 64];
        cfg[..8].copy_from_slice(&(self.disk.len() as u64 / SECTOR).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) {
        let Some(q) = queues.get_mut(index as usize) else {
            return;
        };
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used = self.handle(chain, mem);
            self.requests += 1;
            if let Err(e) = q.add_used(mem, head, used) {
                tracing::warn!("virtio-blk: add_used failed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio_mmio::tests::{handshake, rd, setup_queue, wr};
    use crate::devices::virtio_mmio::{reg, status, MmioTransport, VIRTIO_F_VERSION_1};
    use crate::memory::{GuestMemory, GuestRam};

    const Q: u64 = 0x10_0000; // rings
    const BUF: u64 = 0x20_0000; // buffers

    /// A tiny virtio driver working on real guest memory: posts one request with a 16-byte
    /// header, `data_len` writable data bytes and a status byte, notifies and returns
    /// (status, data, used len).
    struct Driver {
        ram: Arc<GuestMemory>,
        t: MmioTransport<BlockDevice>,
        avail_idx: u16,
    }

    impl Driver {
        fn new(disk: Vec<u8>) -> Driver {
            let ram = Arc::new(GuestMemory::new(GuestRam::new("blk", 4 << 20).unwrap()));
            let mut t =
                MmioTransport::new(BlockDevice::new(disk.into(), "kscope-root"), ram.clone());
            handshake(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO);
            setup_queue(&mut t, 0, 16, Q);
            let s = rd(&mut t, reg::STATUS);
            wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
            assert!(t.is_active());
            Driver {
                ram,
                t,
                avail_idx: 0,
            }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.ram.load().write(Q + i as u64 * 16, &d).unwrap();
        }

        fn request(&mut self, kind: u32, sector: u64, data_len: u32) -> (u8, Vec<u8>, u32) {
            let ram = self.ram.load();
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            ram.write(BUF, &hdr).unwrap();
            ram.write(BUF + 0x2000, &[0xff]).unwrap();
            // NEXT = 1, WRITE = 2.
            self.desc(0, BUF, 16, 1, 1);
            self.desc(1, BUF + 0x1000, data_len, 1 | 2, 2);
            self.desc(2, BUF + 0x2000, 1, 2, 0);
            let slot = self.avail_idx % 16;
            ram.write(Q + 0x1000 + 4 + slot as u64 * 2, &0u16.to_le_bytes())
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            ram.write(Q + 0x1000 + 2, &self.avail_idx.to_le_bytes())
                .unwrap();
            wr(&mut self.t, reg::QUEUE_NOTIFY, 0);
            let mut used_idx = [0u8; 2];
            ram.read(Q + 0x2000 + 2, &mut used_idx).unwrap();
            assert_eq!(u16::from_le_bytes(used_idx), self.avail_idx);
            let mut elem = [0u8; 8];
            ram.read(Q + 0x2000 + 4 + slot as u64 * 8, &mut elem)
                .unwrap();
            let used_len = u32::from_le_bytes(elem[4..].try_into().unwrap());
            let mut st = [0u8];
            ram.read(BUF + 0x2000, &mut st).unwrap();
            let mut data = vec![0u8; data_len as usize];
            ram.read(BUF + 0x1000, &mut data).unwrap();
            (st[0], data, used_len)
        }
    }

    fn disk() -> Vec<u8> {
        (0..8192u32).map(|i| (i / 512) as u8 ^ (i as u8)).collect()
    }

    #[test]
    fn reads_sectors() {
        let d = disk();
        let mut drv = Driver::new(d.clone());
        let (st, data, used) = drv.request(T_IN, 2, 1024);
        assert_eq!(st, S_OK);
        assert_eq!(data, d[1024..2048]);
        assert_eq!(used, 1025);
        let (st, data, _) = drv.request(T_IN, 15, 512);
        assert_eq!(st, S_OK);
        assert_eq!(data, d[7680..]);
        assert_eq!(drv.t.device().requests, 2);
    }

    #[test]
    fn out_of_range_and_writes_fail() {
        let mut drv = Driver::new(disk());
        assert_eq!(drv.request(T_IN, 15, 1024).0, S_IOERR);
        assert_eq!(drv.request(T_IN, u64::MAX / 2, 512).0, S_IOERR);
        assert_eq!(drv.request(T_OUT, 0, 512).0, S_IOERR);
        assert_eq!(drv.request(99, 0, 512).0, S_UNSUPP);
    }

    #[test]
    fn get_id_and_capacity() {
        let mut drv = Driver::new(disk());
        let (st, data, _) = drv.request(T_GET_ID, 0, 20);
        assert_eq!(st, S_OK);
        assert_eq!(&data[..11], b"kscope-root");
        let mut cap = [0u8; 8];
        drv.t.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
    }
}
