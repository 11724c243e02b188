//! Address buses (one for port I/O, one for MMIO) routing guest accesses to devices.

use std::sync::{Arc, Mutex};

use crate::error::VmError;

/// A device reachable through a [`Bus`]. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by a device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r: Vec<_> = self.ranges.iter().map(|r| (r.base, r.len)).collect();
        f.debug_struct("Bus").field("ranges", &r).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Serve `[base, base+len)` with `dev`. Fails on overlap or an empty range.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), VmError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| VmError::BadConfig(format!("bad bus range {base:#x}+{len:#x}")))?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(VmError::BadConfig(format!(
                "bus range {base:#x}..{end:#x} overlaps another device"
            )));
        }
        self.ranges.push(Range { base, len, dev });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        let off = addr - r.base;
        (off + size as u64 <= r.len).then_some((r, off))
    }

    /// Route a read; returns false if no device serves the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, off)) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Route a write; returns false if no device serves the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, off)) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Reg(vec![0; 0x10]))))
            .unwrap();
        bus.insert(0x200, 0x10, Arc::new(Mutex::new(Reg(vec![0; 0x10]))))
            .unwrap();
        assert!(bus
            .insert(0x108, 0x10, Arc::new(Mutex::new(Reg(vec![0; 0x10]))))
            .is_err());
        assert!(bus
            .insert(0x300, 0, Arc::new(Mutex::new(Reg(vec![]))))
            .is_err());
        assert!(bus.write(0x204, &[1, 2]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x204, &mut b));
        assert_eq!(b, [1, 2]);
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [0, 0]);
        assert!(!bus.read(0x0ff, &mut b));
        assert!(!bus.read(0x10f, &mut b)); // straddles the end
        assert!(!bus.write(0x150, &[1]));
    }
}
