//! Validation of a snapshot's payload against its own configuration, before anything is
//! created: every field a restore would hand to KVM, to a device or to the guest is checked
//! (vCPU registers, device and queue state, sizes), so a state file with a correct checksum
//! but inconsistent contents is refused with the field it got wrong instead of crashing or
//! hanging the guest.

use crate::devices::virtio_mmio::{QueueSnapshot, TransportState};
use crate::snapfile::MemoryInfo;

use super::SnapshotPayload;

/// Longest kernel command line accepted.
const MAX_CMDLINE: usize = 4096;
/// Longest VM name accepted.
const MAX_NAME: usize = 256;
/// The UART's receive FIFO.
const SERIAL_FIFO: usize = 64;
/// virtio device status bits (ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED).
const STATUS_BITS: u32 = 0x01 | 0x02 | 0x04 | 0x08 | 0x40 | 0x80;

/// Checks `p` (and the memory file's record `info`); the error names the field.
pub(crate) fn validate_payload(p: &SnapshotPayload, info: &MemoryInfo) -> Result<(), String> {
    crate::memory::validate_size(p.mem_bytes).map_err(|e| e.to_string())?;
    if info.pages * crate::lazy::PAGE_SIZE as u64 != p.mem_bytes {
        return Err(format!(
            "memory file has {} pages for {} bytes of RAM",
            info.pages, p.mem_bytes
        ));
    }
    if info.data_pages > info.pages {
        return Err(format!(
            "memory file records {} data pages of {}",
            info.data_pages, info.pages
        ));
    }
    if p.name.len() > MAX_NAME {
        return Err(format!(
            "name is {} bytes, at most {MAX_NAME}",
            p.name.len()
        ));
    }
    if p.cmdline.len() > MAX_CMDLINE || p.cmdline.contains('\0') {
        return Err(format!(
            "cmdline is {} bytes or holds a NUL (at most {MAX_CMDLINE} bytes)",
            p.cmdline.len()
        ));
    }
    for (what, b) in [("kernel", &p.kernel), ("disk", &p.disk)] {
        if b.file.is_empty() || b.file.contains('/') || b.file.starts_with('.') {
            return Err(format!(
                "{what} file name {:?} escapes the snapshot directory",
                b.file
            ));
        }
    }
    if p.kernel.len == 0 {
        return Err("kernel image is empty".into());
    }
    let n = p.machine.vcpus.len();
    if n == 0 || n > crate::config::MAX_VCPUS as usize {
        return Err(format!(
            "{n} vCPU states (1..={})",
            crate::config::MAX_VCPUS
        ));
    }
    for (i, v) in p.machine.vcpus.iter().enumerate() {
        v.validate(p.mem_bytes)
            .map_err(|e| format!("vCPU {i}: {e}"))?;
    }
    let d = &p.machine.devices;
    if d.serial.in_buffer.len() > SERIAL_FIFO {
        return Err(format!(
            "serial receive FIFO holds {} bytes, at most {SERIAL_FIFO}",
            d.serial.in_buffer.len()
        ));
    }
    transport(
        "block device",
        &d.block,
        &[crate::devices::block::QUEUE_SIZE],
        p.mem_bytes,
    )?;
    let rq = kscope_guest::abi::request::QUEUE_SIZE;
    transport("request device", &d.request, &[rq, rq], p.mem_bytes)?;
    Ok(())
}

fn transport(what: &str, t: &TransportState, maxes: &[u16], mem: u64) -> Result<(), String> {
    if t.status & !STATUS_BITS != 0 {
        return Err(format!("{what}: status {:#x} has unknown bits", t.status));
    }
    if t.interrupt_status & !3 != 0 {
        return Err(format!(
            "{what}: interrupt status {:#x} has unknown bits",
            t.interrupt_status
        ));
    }
    if t.queues.len() != maxes.len() {
        return Err(format!(
            "{what}: {} queues saved, the device has {}",
            t.queues.len(),
            maxes.len()
        ));
    }
    for (i, (q, &max)) in t.queues.iter().zip(maxes).enumerate() {
        queue(q, max, mem).map_err(|e| format!("{what} queue {i}: {e}"))?;
    }
    Ok(())
}

/// A queue's rings lie inside guest RAM, aligned, for its size (split virtqueue layout).
fn queue(q: &QueueSnapshot, max: u16, mem: u64) -> Result<(), String> {
    if q.max_size != max {
        return Err(format!("max size {}, the device offers {max}", q.max_size));
    }
    if q.ready && (q.size == 0 || !q.size.is_power_of_two() || q.size > max) {
        return Err(format!(
            "size {} is not a power of two in 1..={max}",
            q.size
        ));
    }
    let size = u64::from(q.size.max(1));
    let rings = [
        ("descriptor table", q.desc_table, 16 * size, 16),
        ("available ring", q.avail_ring, 6 + 2 * size, 2),
        ("used ring", q.used_ring, 6 + 8 * size, 4),
    ];
    for (name, gpa, len, align) in rings {
        if !q.ready && gpa == 0 {
            continue;
        }
        if gpa % align != 0 || gpa.checked_add(len).is_none_or(|end| end > mem) {
            return Err(format!(
                "{name} at GPA {gpa:#x} (+{len} bytes) is not {align}-byte aligned inside the {mem:#x} bytes of guest RAM"
            ));
        }
    }
    Ok(())
}
