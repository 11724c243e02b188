//! The GDT and the 64-bit TSS the VMM installs before the first instruction.
//!
//! Layout (selectors from `abi::layout::selectors`): null, kernel code64 (0x08), kernel data
//! (0x10), user data DPL3 (0x18), user code64 DPL3 (0x20), busy 64-bit TSS (0x28, 16 bytes).
//! Descriptors have their accessed bit set so that the CPU never writes the table.

use crate::hypervisor::Segment;
use kscope_guest::abi::layout::{phys_to_virt, selectors, TRAP_STACK_TOP_GPA, TSS_GPA};

/// Number of 8-byte GDT slots (the TSS takes two).
pub const GDT_ENTRIES: usize = 7;
/// Size of the 64-bit TSS.
pub const TSS_SIZE: usize = 104;

/// Encode a code/data or system descriptor.
pub const fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags as u64) & 0xf) << 52)
        | (((base as u64 >> 24) & 0xff) << 56)
}

/// Flags nibble: G=1, L=1 (64-bit code).
const FLAGS_CODE64: u8 = 0b1010;
/// Flags nibble: G=1, D/B=1 (data).
const FLAGS_DATA: u8 = 0b1100;
/// Access byte: present, S=1, code exec/read, accessed; DPL in bits 5-6.
const ACCESS_CODE: u8 = 0x9b;
/// Access byte: present, S=1, data read/write, accessed.
const ACCESS_DATA: u8 = 0x93;
/// Access byte: present, system, type 0xB (busy 64-bit TSS).
const ACCESS_TSS_BUSY: u8 = 0x8b;

/// The GDT as 8-byte entries.
pub fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let tss_base = phys_to_virt(TSS_GPA);
    let tss_limit = (TSS_SIZE - 1) as u32;
    [
        0,
        descriptor(0, 0xfffff, ACCESS_CODE, FLAGS_CODE64),
        descriptor(0, 0xfffff, ACCESS_DATA, FLAGS_DATA),
        descriptor(0, 0xfffff, ACCESS_DATA | 0x60, FLAGS_DATA),
        descriptor(0, 0xfffff, ACCESS_CODE | 0x60, FLAGS_CODE64),
        descriptor(tss_base as u32, tss_limit, ACCESS_TSS_BUSY, 0),
        tss_base >> 32,
    ]
}

/// The GDT as bytes (for writing to `GDT_GPA`).
pub fn gdt_bytes() -> Vec<u8> {
    gdt_entries().iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The 64-bit TSS: RSP0 = IST1 = the trap stack top (direct-map address); no I/O bitmap.
pub fn tss_bytes() -> [u8; TSS_SIZE] {
    let mut t = [0u8; TSS_SIZE];
    let top = phys_to_virt(TRAP_STACK_TOP_GPA).to_le_bytes();
    t[4..12].copy_from_slice(&top); // RSP0
    t[36..44].copy_from_slice(&top); // IST1
    t[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes()); // I/O map base = limit
    t
}

/// Decode a code/data descriptor of the GDT into the hidden segment state KVM needs.
pub fn segment_from_descriptor(selector: u16, d: u64) -> Segment {
    let access = (d >> 40) as u8;
    let flags = ((d >> 52) & 0xf) as u8;
    let g = flags & 0b1000 != 0;
    let raw_limit = ((d & 0xffff) | (((d >> 48) & 0xf) << 16)) as u32;
    Segment {
        selector,
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        type_: access & 0xf,
        present: access & 0x80 != 0,
        dpl: (access >> 5) & 3,
        db: flags & 0b0100 != 0,
        s: access & 0x10 != 0,
        l: flags & 0b0010 != 0,
        g,
    }
}

/// Kernel code segment state (CS at entry).
pub fn kernel_code_segment() -> Segment {
    segment_from_descriptor(selectors::KERNEL_CS, gdt_entries()[1])
}

/// Kernel data segment state (DS/ES/FS/GS/SS at entry).
pub fn kernel_data_segment() -> Segment {
    segment_from_descriptor(selectors::KERNEL_DS, gdt_entries()[2])
}

/// Task register state: the busy 64-bit TSS.
pub fn tss_segment() -> Segment {
    Segment {
        selector: selectors::TSS,
        base: phys_to_virt(TSS_GPA),
        limit: (TSS_SIZE - 1) as u32,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: false,
        s: false,
        l: false,
        g: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_descriptor_values() {
        let g = gdt_entries();
        assert_eq!(g[0], 0);
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        assert_eq!(g[3], 0x00cf_f300_0000_ffff);
        assert_eq!(g[4], 0x00af_fb00_0000_ffff);
        assert_eq!(gdt_bytes().len(), 56);
    }

    #[test]
    fn selectors_decode_to_the_right_privilege() {
        let g = gdt_entries();
        let cs = kernel_code_segment();
        assert!(cs.l && cs.s && cs.present && cs.g && !cs.db);
        assert_eq!((cs.dpl, cs.type_, cs.limit), (0, 0xb, 0xffff_ffff));
        let ds = kernel_data_segment();
        assert!(!ds.l && ds.db && ds.s);
        assert_eq!((ds.dpl, ds.type_), (0, 3));
        let uds =
            segment_from_descriptor(selectors::USER_DS, g[(selectors::USER_DS >> 3) as usize]);
        assert_eq!(uds.dpl, 3);
        let ucs =
            segment_from_descriptor(selectors::USER_CS, g[(selectors::USER_CS >> 3) as usize]);
        assert!(ucs.l);
        assert_eq!(ucs.dpl, 3);
    }

    #[test]
    fn tss_descriptor_points_at_the_tss() {
        let g = gdt_entries();
        let lo = g[(selectors::TSS >> 3) as usize];
        let hi = g[(selectors::TSS >> 3) as usize + 1];
        let base = ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | (hi << 32);
        assert_eq!(base, phys_to_virt(TSS_GPA));
        assert_eq!((lo >> 40) as u8, 0x8b);
        assert_eq!(lo & 0xffff, 103);
        let t = tss_bytes();
        let rsp0 = u64::from_le_bytes(t[4..12].try_into().unwrap());
        let ist1 = u64::from_le_bytes(t[36..44].try_into().unwrap());
        assert_eq!(rsp0, phys_to_virt(TRAP_STACK_TOP_GPA));
        assert_eq!(ist1, rsp0);
        assert_eq!(u16::from_le_bytes([t[102], t[103]]), 104);
    }
}
