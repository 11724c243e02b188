//! Boot page tables built by the VMM in `[BOOT_PT_GPA, BOOT_PT_END)`.
//!
//! They map (a) `DIRECT_MAP_BASE + x -> x` for all guest RAM and (b)
//! `KERNEL_VIRT_BASE + x -> x` for the first 1 GiB, both with 2 MiB pages, and nothing else
//! (no identity map). Layout of the table pages:
//!
//! ```text
//! BOOT_PT_GPA + 0x0000  PML4
//! BOOT_PT_GPA + 0x1000  PDPT of the direct map
//! BOOT_PT_GPA + 0x2000  PDPT of the kernel-image map
//! BOOT_PT_GPA + 0x3000  PD of the kernel-image map (first 1 GiB)
//! BOOT_PT_GPA + 0x4000  PDs of the direct map, one per GiB of RAM (at most 8)
//! ```

use kscope_guest::abi::layout::{
    BOOT_PT_END, BOOT_PT_GPA, DIRECT_MAP_BASE, KERNEL_VIRT_BASE, LARGE_PAGE_SIZE, MAX_GUEST_RAM,
    PAGE_SIZE,
};

/// Present.
pub const PTE_P: u64 = 1;
/// Writable.
pub const PTE_W: u64 = 1 << 1;
/// User-accessible.
pub const PTE_U: u64 = 1 << 2;
/// Page size (2 MiB page in a PD entry).
pub const PTE_PS: u64 = 1 << 7;

/// GPA of the PML4 (the boot CR3).
pub const PML4_GPA: u64 = BOOT_PT_GPA;
/// GPA of the direct map's PDPT.
pub const DIRECT_PDPT_GPA: u64 = BOOT_PT_GPA + 0x1000;
/// GPA of the kernel-image map's PDPT.
pub const KERNEL_PDPT_GPA: u64 = BOOT_PT_GPA + 0x2000;
/// GPA of the kernel-image map's PD.
pub const KERNEL_PD_GPA: u64 = BOOT_PT_GPA + 0x3000;
/// GPA of the first PD of the direct map.
pub const DIRECT_PD_GPA: u64 = BOOT_PT_GPA + 0x4000;

const GIB: u64 = 1 << 30;
const _: () = assert!(DIRECT_PD_GPA + (MAX_GUEST_RAM / GIB) * PAGE_SIZE <= BOOT_PT_END);

/// PML4 index of a virtual address.
pub const fn pml4_index(va: u64) -> usize {
    ((va >> 39) & 511) as usize
}
/// PDPT index of a virtual address.
pub const fn pdpt_index(va: u64) -> usize {
    ((va >> 30) & 511) as usize
}
/// PD index of a virtual address.
pub const fn pd_index(va: u64) -> usize {
    ((va >> 21) & 511) as usize
}

/// The boot page tables: `(gpa, 4 KiB page)` pairs to write into guest RAM. `native`: the
/// kernel will run under PVM's native switch, where it executes at hardware CPL3 and PVM
/// lets it reach only pages whose every level has U/S set (measured: a supervisor-only
/// kernel page refaults forever, see docs/PERFORMANCE-NOTES.md), so every entry gets U/S.
pub fn build(mem_bytes: u64, native: bool) -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = [0u64; 512];
    let mut direct_pdpt = [0u64; 512];
    let mut kernel_pdpt = [0u64; 512];
    let mut kernel_pd = [0u64; 512];
    pml4[pml4_index(DIRECT_MAP_BASE)] = DIRECT_PDPT_GPA | PTE_P | PTE_W;
    pml4[pml4_index(KERNEL_VIRT_BASE)] = KERNEL_PDPT_GPA | PTE_P | PTE_W;
    kernel_pdpt[pdpt_index(KERNEL_VIRT_BASE)] = KERNEL_PD_GPA | PTE_P | PTE_W;
    for (i, e) in kernel_pd.iter_mut().enumerate() {
        *e = (i as u64 * LARGE_PAGE_SIZE) | PTE_P | PTE_W | PTE_PS;
    }
    let mut pages = vec![];
    let gibs = mem_bytes.div_ceil(GIB);
    for g in 0..gibs {
        let pd_gpa = DIRECT_PD_GPA + g * PAGE_SIZE;
        direct_pdpt[pdpt_index(DIRECT_MAP_BASE) + g as usize] = pd_gpa | PTE_P | PTE_W;
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            let pa = g * GIB + i as u64 * LARGE_PAGE_SIZE;
            if pa < mem_bytes {
                *e = pa | PTE_P | PTE_W | PTE_PS;
            }
        }
        pages.push((pd_gpa, to_bytes(&pd)));
    }
    pages.push((PML4_GPA, to_bytes(&pml4)));
    pages.push((DIRECT_PDPT_GPA, to_bytes(&direct_pdpt)));
    pages.push((KERNEL_PDPT_GPA, to_bytes(&kernel_pdpt)));
    pages.push((KERNEL_PD_GPA, to_bytes(&kernel_pd)));
    if native {
        for (_, page) in &mut pages {
            for e in page.chunks_mut(8) {
                let v = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
                if v & PTE_P != 0 {
                    e.copy_from_slice(&(v | PTE_U).to_le_bytes());
                }
            }
        }
    }
    pages
}

fn to_bytes(t: &[u64; 512]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Translate `va` through 4-level page tables rooted at `cr3`, reading 8-byte entries with
/// `read(gpa)`. Handles 1 GiB, 2 MiB and 4 KiB pages. Returns `None` if not mapped.
pub fn translate(cr3: u64, va: u64, read: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let pml4e = read((cr3 & ADDR) + pml4_index(va) as u64 * 8)?;
    if pml4e & PTE_P == 0 {
        return None;
    }
    let pdpte = read((pml4e & ADDR) + pdpt_index(va) as u64 * 8)?;
    if pdpte & PTE_P == 0 {
        return None;
    }
    if pdpte & PTE_PS != 0 {
        return Some((pdpte & ADDR & !(GIB - 1)) | (va & (GIB - 1)));
    }
    let pde = read((pdpte & ADDR) + pd_index(va) as u64 * 8)?;
    if pde & PTE_P == 0 {
        return None;
    }
    if pde & PTE_PS != 0 {
        return Some((pde & ADDR & !(LARGE_PAGE_SIZE - 1)) | (va & (LARGE_PAGE_SIZE - 1)));
    }
    let pte = read((pde & ADDR) + ((va >> 12) & 511) * 8)?;
    if pte & PTE_P == 0 {
        return None;
    }
    Some((pte & ADDR) | (va & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn memory(mem_bytes: u64) -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for (gpa, page) in build(mem_bytes, false) {
            assert!((BOOT_PT_GPA..BOOT_PT_END).contains(&gpa));
            for (i, c) in page.chunks(8).enumerate() {
                m.insert(
                    gpa + i as u64 * 8,
                    u64::from_le_bytes(c.try_into().unwrap()),
                );
            }
        }
        m
    }

    #[test]
    fn direct_map_covers_exactly_ram() {
        for mem in [4 << 20, 64 << 20, (1 << 30) + (2 << 20), 3 << 30] {
            let m = memory(mem);
            let rd = |gpa| m.get(&gpa).copied();
            for pa in [0, 0x1000, 0x12_3456, mem - 1] {
                assert_eq!(
                    translate(PML4_GPA, DIRECT_MAP_BASE + pa, rd),
                    Some(pa),
                    "{mem:#x} {pa:#x}"
                );
            }
            assert_eq!(translate(PML4_GPA, DIRECT_MAP_BASE + mem, rd), None);
        }
    }

    #[test]
    fn kernel_map_covers_first_gib_and_no_identity_map() {
        let m = memory(64 << 20);
        let rd = |gpa| m.get(&gpa).copied();
        assert_eq!(
            translate(PML4_GPA, KERNEL_VIRT_BASE + 0x10_0000, rd),
            Some(0x10_0000)
        );
        assert_eq!(
            translate(PML4_GPA, KERNEL_VIRT_BASE + GIB - 1, rd),
            Some(GIB - 1)
        );
        assert_eq!(translate(PML4_GPA, KERNEL_VIRT_BASE + GIB, rd), None);
        assert_eq!(translate(PML4_GPA, 0x10_0000, rd), None);
        // Entries are kernel-only (no U/S bit) 2 MiB pages.
        let pde = m[&(KERNEL_PD_GPA + 8)];
        assert_eq!(pde, (2 << 20) | PTE_P | PTE_W | PTE_PS);
    }
}
