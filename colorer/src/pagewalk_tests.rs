//! Tests of the page-table walker on hand-built tables.

use super::*;
use crate::synth::{pte, ImageBuilder};

const MEM: u64 = 8 << 20;

fn builder() -> (ImageBuilder, Gfn) {
    let mut b = ImageBuilder::new(MEM, 16);
    let root = b.new_table().unwrap();
    (b, root)
}

fn leaves(b: &ImageBuilder, root: Gfn) -> (Vec<TableFrame>, Vec<Mapping>, WalkStats) {
    walk_all(&b.mem, root * PAGE_SIZE).unwrap()
}

#[test]
fn leaves_of_every_size_with_flags() {
    let (mut b, root) = builder();
    // 4 KiB user code, 4 KiB user data, 2 MiB kernel data, 1 GiB kernel code (beyond RAM is
    // fine for a leaf), user read-only.
    b.map(
        root,
        0x40_0000,
        0x20_0000,
        PageSize::Size4K,
        pte::US | pte::A,
    )
    .unwrap();
    b.map(
        root,
        0x40_1000,
        0x20_1000,
        PageSize::Size4K,
        pte::US | pte::RW | pte::NX | pte::D,
    )
    .unwrap();
    b.map(
        root,
        0xffff_8880_0000_0000,
        0x40_0000,
        PageSize::Size2M,
        pte::RW | pte::NX | pte::G,
    )
    .unwrap();
    b.map(root, 0xffff_ffff_8000_0000, 0, PageSize::Size1G, 0)
        .unwrap();
    b.map(
        root,
        0x7fff_ffff_e000,
        0x30_0000,
        PageSize::Size4K,
        pte::US | pte::NX,
    )
    .unwrap();
    let (tables, maps, stats) = leaves(&b, root);
    assert_eq!(stats.leaves, 5);
    assert_eq!(tables.len() as u64, stats.tables);
    assert_eq!(
        tables[0],
        TableFrame {
            gfn: root,
            level: 4
        }
    );
    let mut sorted_tables: Vec<Gfn> = tables.iter().map(|t| t.gfn).collect();
    sorted_tables.sort_unstable();
    let mut built = b.tables.clone();
    built.sort_unstable();
    assert_eq!(sorted_tables, built);
    let find = |va: u64| *maps.iter().find(|m| m.va == va).unwrap();
    let code = find(0x40_0000);
    assert_eq!((code.pa, code.size), (0x20_0000, PageSize::Size4K));
    assert!(code.flags.user && !code.flags.nx && !code.flags.writable && code.flags.accessed);
    let data = find(0x40_1000);
    assert!(data.flags.user && data.flags.nx && data.flags.writable && data.flags.dirty);
    let dm = find(0xffff_8880_0000_0000);
    assert_eq!(dm.size, PageSize::Size2M);
    assert!(!dm.flags.user && dm.flags.nx && dm.flags.global);
    let k = find(0xffff_ffff_8000_0000);
    assert_eq!((k.pa, k.size), (0, PageSize::Size1G));
    assert!(!k.flags.nx && !k.flags.user);
    let stack = find(0x7fff_ffff_e000);
    assert!(stack.flags.user && stack.flags.nx && !stack.flags.writable);
    assert_eq!(stats.loops + stats.malformed + stats.table_out_of_range, 0);
}

#[test]
fn upper_level_flags_restrict_leaves() {
    let (mut b, root) = builder();
    b.map(
        root,
        0x40_0000,
        0x20_0000,
        PageSize::Size4K,
        pte::US | pte::RW,
    )
    .unwrap();
    // Clear U/S and set XD on the PML4 entry: the leaf becomes supervisor and NX.
    let e = b.read_u64(root * PAGE_SIZE);
    b.write_u64(root * PAGE_SIZE, (e & !pte::US) | pte::NX);
    let (_, maps, _) = leaves(&b, root);
    assert_eq!(maps.len(), 1);
    assert!(!maps[0].flags.user && maps[0].flags.nx && maps[0].flags.writable);
}

#[test]
fn non_present_garbage_is_ignored_and_large_leaves_mask_reserved_bits() {
    let (mut b, root) = builder();
    // Non-present entries full of junk.
    for i in 1..40 {
        b.write_u64(root * PAGE_SIZE + i * 8, 0xdead_beef_dead_bee0 + (i << 1));
    }
    b.map(root, 0x20_0000, 0x40_0000, PageSize::Size2M, pte::US)
        .unwrap();
    // Set junk low bits in the PA of the 2 MiB leaf (PAT bit 12 and reserved bits).
    let (_, maps, _) = leaves(&b, root);
    let pd = b
        .tables
        .iter()
        .copied()
        .find(|&t| t != root && b.read_u64(t * PAGE_SIZE + 8) != 0)
        .unwrap();
    let e = b.read_u64(pd * PAGE_SIZE + 8);
    b.write_u64(pd * PAGE_SIZE + 8, e | 0x1f_f000);
    let (_, maps2, _) = leaves(&b, root);
    assert_eq!(maps, maps2);
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].va, maps[0].pa), (0x20_0000, 0x40_0000));
}

#[test]
fn out_of_range_pointers_loops_and_malformed_entries() {
    let (mut b, root) = builder();
    b.map(root, 0x40_0000, 0x20_0000, PageSize::Size4K, pte::US)
        .unwrap();
    let r = root * PAGE_SIZE;
    // PML4[1] -> a table far beyond RAM; PML4[2] -> the PML4 itself (self map);
    // PML4[3] has PS (malformed); PML4[4] -> the same PDPT as PML4[0] (shared).
    b.write_u64(r + 8, 0x7_0000_0000 | pte::P | pte::RW);
    b.write_u64(r + 16, r | pte::P | pte::RW);
    b.write_u64(r + 24, 0x20_0000 | pte::P | pte::PS);
    let pdpt = b.read_u64(r);
    b.write_u64(r + 32, pdpt);
    // A PD entry pointing back to the PDPT (a loop two levels up).
    let pdpt_gfn = (pdpt & 0x000f_ffff_ffff_f000) / PAGE_SIZE;
    let pd = b.read_u64(pdpt_gfn * PAGE_SIZE) & 0x000f_ffff_ffff_f000;
    b.write_u64(pd + 8, (pdpt_gfn * PAGE_SIZE) | pte::P | pte::RW | pte::US);
    let (tables, maps, stats) = leaves(&b, root);
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert_eq!(stats.table_out_of_range, 1);
    assert_eq!(stats.loops, 2);
    assert_eq!(stats.malformed, 1);
    assert_eq!(stats.shared, 1);
    assert_eq!(tables.len(), 4);
    // A root outside RAM is an error, not a panic.
    assert!(matches!(
        walk_all(&b.mem, MEM),
        Err(WalkError::RootOutOfRange { .. })
    ));
}

#[test]
fn garbage_memory_terminates_with_bounded_work() {
    // Every entry of every frame present and pointing into RAM: the worst case for a walker.
    let frames = 64u64;
    let mut mem = vec![0u8; (frames * PAGE_SIZE) as usize];
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in mem.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = ((x % frames) << 12) | (x & 0x8000_0000_0000_00e7) | pte::P;
        c.copy_from_slice(&v.to_le_bytes());
    }
    for root in 0..frames {
        let (tables, _, stats) = walk_all(&mem, root * PAGE_SIZE).unwrap();
        // Each (frame, level) at most once.
        assert!(tables.len() as u64 <= 4 * frames);
        assert!(stats.tables <= 4 * frames);
        assert!(stats.leaves <= 4 * frames * 512);
    }
}

#[test]
fn shared_visited_set_walks_kernel_half_once() {
    let (mut b, kroot) = builder();
    b.map(
        kroot,
        0xffff_ffff_8010_0000,
        0x10_0000,
        PageSize::Size4K,
        pte::G,
    )
    .unwrap();
    let proc_root = b.new_table().unwrap();
    for e in 256..512 {
        let v = b.read_u64(kroot * PAGE_SIZE + e * 8);
        b.write_u64(proc_root * PAGE_SIZE + e * 8, v);
    }
    b.map(proc_root, 0x40_0000, 0x20_0000, PageSize::Size4K, pte::US)
        .unwrap();
    let mut visited = Visited::new(MEM / PAGE_SIZE);
    let mut n = 0;
    let s1 = walk(&b.mem, kroot * PAGE_SIZE, &mut visited, &mut |e| {
        n += u64::from(matches!(e, WalkEvent::Leaf(_)))
    })
    .unwrap();
    let s2 = walk(&b.mem, proc_root * PAGE_SIZE, &mut visited, &mut |e| {
        n += u64::from(matches!(e, WalkEvent::Leaf(_)))
    })
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(s1.tables, 4);
    assert_eq!(s2.tables, 4); // its PML4 + PDPT + PD + PT of the user half
    assert_eq!(s2.shared, 1);
    // Walking the same root again is free.
    let s3 = walk(&b.mem, kroot * PAGE_SIZE, &mut visited, &mut |_| {}).unwrap();
    assert_eq!((s3.tables, s3.shared), (0, 1));
}

#[test]
fn translate_matches_walk() {
    let (mut b, root) = builder();
    b.map(root, 0x40_0000, 0x20_0000, PageSize::Size4K, pte::US)
        .unwrap();
    b.map(root, 0xffff_8880_0000_0000, 0, PageSize::Size2M, pte::NX)
        .unwrap();
    b.map(root, 0xffff_ffff_c000_0000, 0, PageSize::Size1G, 0)
        .unwrap();
    let r = root * PAGE_SIZE;
    assert_eq!(
        translate(&b.mem, r, 0x40_0123).unwrap().unwrap().0,
        0x20_0123
    );
    assert_eq!(
        translate(&b.mem, r, 0xffff_8880_0012_3456)
            .unwrap()
            .unwrap()
            .0,
        0x12_3456
    );
    let (pa, m) = translate(&b.mem, r, 0xffff_ffff_c123_4567)
        .unwrap()
        .unwrap();
    assert_eq!((pa, m.size), (0x123_4567, PageSize::Size1G));
    assert!(translate(&b.mem, r, 0x40_1000).unwrap().is_none());
    assert!(translate(&b.mem, r, 0xffff_9000_0000_0000)
        .unwrap()
        .is_none());
    assert!(translate(&b.mem, MEM + 4096, 0).is_err());
}

#[test]
fn canonical_addresses() {
    assert_eq!(canonical(0x0000_8000_0000_0000), 0xffff_8000_0000_0000);
    assert_eq!(canonical(0x0000_7fff_ffff_f000), 0x0000_7fff_ffff_f000);
    assert_eq!(PageSize::Size1G.frames(), 262_144);
}
