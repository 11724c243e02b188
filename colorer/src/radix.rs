//! Reader of kscope's page-cache radix trees ([`kscope_guest::abi::RadixNode`]).
//!
//! Guest memory is untrusted: each node is read at most once (by physical address), a child's
//! shift must be its parent's minus [`RADIX_SHIFT`], heights are capped, slots must be
//! page-aligned addresses of guest RAM, and the number of nodes is bounded, so the reader
//! terminates on any content and never panics. Pages come out in file order (ascending index).

use crate::mem::Gfn;
use crate::profile::ProfileAnomalies;
use kscope_guest::abi::kinfo::{RadixNode, RADIX_FANOUT, RADIX_SHIFT};
use std::collections::HashSet;

/// Largest root shift accepted (indices up to 2^60 pages).
pub const MAX_SHIFT: u32 = 54;

/// Read a radix tree.
///
/// - `root`: virtual address of the root node (0 = empty tree);
/// - `read_node(va)`: the node at `va` and its guest-physical address, or `None` if `va`
///   does not translate to guest RAM;
/// - `page_gfn(va)`: the frame of a leaf slot's page address, or `None` if it is not a
///   page-aligned address of guest RAM;
/// - `max_nodes`: budget of nodes (e.g. the number of frames times 8).
///
/// Returns `(index, frame)` pairs in ascending index order.
pub fn read_tree(
    root: u64,
    read_node: &mut dyn FnMut(u64) -> Option<(u64, RadixNode)>,
    page_gfn: &mut dyn FnMut(u64) -> Option<Gfn>,
    max_nodes: usize,
    anomalies: &mut ProfileAnomalies,
) -> Vec<(u64, Gfn)> {
    let mut r = Reader {
        read_node,
        page_gfn,
        seen: HashSet::new(),
        max_nodes,
        anomalies,
        out: Vec::new(),
    };
    if root != 0 {
        r.node(root, 0, None, 0);
    }
    r.out
}

struct Reader<'a> {
    read_node: &'a mut dyn FnMut(u64) -> Option<(u64, RadixNode)>,
    page_gfn: &'a mut dyn FnMut(u64) -> Option<Gfn>,
    seen: HashSet<u64>,
    max_nodes: usize,
    anomalies: &'a mut ProfileAnomalies,
    out: Vec<(u64, Gfn)>,
}

impl Reader<'_> {
    /// Read the node at `va` covering indices with prefix `base`; `parent` is the parent's VA
    /// and its shift (None at the root).
    fn node(&mut self, va: u64, base: u64, parent: Option<(u64, u32)>, depth: u32) {
        if self.seen.len() >= self.max_nodes || depth > MAX_SHIFT / RADIX_SHIFT {
            self.anomalies.bad_radix_nodes += 1;
            return;
        }
        let Some((pa, node)) = (self.read_node)(va) else {
            self.anomalies.bad_radix_nodes += 1;
            return;
        };
        if !self.seen.insert(pa) {
            self.anomalies.bad_radix_nodes += 1;
            return;
        }
        let shift_ok = match parent {
            None => node.shift % RADIX_SHIFT == 0 && node.shift <= MAX_SHIFT,
            Some((_, ps)) => node.shift + RADIX_SHIFT == ps,
        };
        if !shift_ok {
            self.anomalies.bad_radix_nodes += 1;
            return;
        }
        if node.parent != parent.map_or(0, |(p, _)| p) {
            self.anomalies.radix_inconsistencies += 1;
        }
        let used = node.slots.iter().filter(|&&s| s != 0).count();
        if used != node.count as usize {
            self.anomalies.radix_inconsistencies += 1;
        }
        debug_assert_eq!(node.slots.len(), RADIX_FANOUT);
        for (i, &slot) in node.slots.iter().enumerate() {
            if slot == 0 {
                continue;
            }
            let index = base | ((i as u64) << node.shift);
            if node.shift == 0 {
                match (self.page_gfn)(slot) {
                    Some(gfn) => self.out.push((index, gfn)),
                    None => self.anomalies.bad_radix_slots += 1,
                }
            } else {
                self.node(slot, index, Some((va, node.shift)), depth + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Nodes by VA; "physical address" = VA for the test.
    fn tree(nodes: &HashMap<u64, RadixNode>, root: u64) -> (Vec<(u64, Gfn)>, ProfileAnomalies) {
        let mut an = ProfileAnomalies::default();
        let out = read_tree(
            root,
            &mut |va| nodes.get(&va).map(|n| (va, *n)),
            &mut |va| (va % 4096 == 0 && va < 0x100_0000).then_some(va / 4096),
            1000,
            &mut an,
        );
        (out, an)
    }

    fn node(shift: u32, parent: u64, slots: &[(usize, u64)]) -> RadixNode {
        let mut n = RadixNode {
            shift,
            count: slots.len() as u32,
            parent,
            slots: [0; RADIX_FANOUT],
        };
        for &(i, v) in slots {
            n.slots[i] = v;
        }
        n
    }

    #[test]
    fn multi_level_sparse_tree_in_file_order() {
        // Height 3: root shift 12. Indices 5, 63, 64*3+1, 4096*2+7.
        let mut nodes = HashMap::new();
        nodes.insert(0x1000, node(12, 0, &[(0, 0x2000), (2, 0x3000)]));
        nodes.insert(0x2000, node(6, 0x1000, &[(0, 0x4000), (3, 0x5000)]));
        nodes.insert(0x3000, node(6, 0x1000, &[(0, 0x6000)]));
        nodes.insert(0x4000, node(0, 0x2000, &[(5, 0x10_0000), (63, 0x20_0000)]));
        nodes.insert(0x5000, node(0, 0x2000, &[(1, 0x30_0000)]));
        nodes.insert(0x6000, node(0, 0x3000, &[(7, 0x8000)]));
        let (out, an) = tree(&nodes, 0x1000);
        assert_eq!(out, vec![(5, 0x100), (63, 0x200), (193, 0x300), (8199, 8)]);
        assert_eq!(an, ProfileAnomalies::default());
    }

    #[test]
    fn garbage_is_skipped_and_counted() {
        let mut nodes = HashMap::new();
        // Slot 1 points back at the root (loop), slot 2 to a node with a wrong shift, slot 3
        // is unmapped, the leaf has an unaligned and an out-of-RAM slot; count is wrong.
        nodes.insert(
            0x1000,
            node(6, 0, &[(0, 0x2000), (1, 0x1000), (2, 0x3000), (3, 0x9000)]),
        );
        nodes.insert(
            0x2000,
            node(0, 0x1000, &[(0, 0x4000), (1, 0x4001), (2, 0x1_0000_0000)]),
        );
        nodes.insert(0x3000, node(12, 0x1000, &[(0, 0x4000)]));
        let (out, an) = tree(&nodes, 0x1000);
        assert_eq!(out, vec![(0, 4)]);
        assert_eq!(an.bad_radix_nodes, 3);
        assert_eq!(an.bad_radix_slots, 2);
        assert_eq!(tree(&nodes, 0).0, vec![]);
        // A root with an impossible height.
        nodes.insert(0x7000, node(60, 0, &[(0, 0x2000)]));
        assert_eq!(tree(&nodes, 0x7000).1.bad_radix_nodes, 1);
    }

    #[test]
    fn node_budget_bounds_work() {
        // A wide tree that shares nothing but exceeds the budget of 1000 nodes: 64 interior
        // nodes x 64 leaves each.
        let mut nodes = HashMap::new();
        let mut root = node(12, 0, &[]);
        for i in 0..64u64 {
            let mid = 0x100_0000 + i * 0x10_0000;
            root.slots[i as usize] = mid;
            let mut m = node(6, 0x1000, &[]);
            for j in 0..64u64 {
                let leaf = mid + (j + 1) * 0x1000;
                m.slots[j as usize] = leaf;
                nodes.insert(leaf, node(0, mid, &[(0, 0x5000)]));
            }
            m.count = 64;
            nodes.insert(mid, m);
        }
        root.count = 64;
        nodes.insert(0x1000, root);
        let (out, an) = tree(&nodes, 0x1000);
        assert!(out.len() < 1000, "{}", out.len());
        assert!(an.bad_radix_nodes > 0);
    }
}
