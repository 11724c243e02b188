//! A guest-agnostic x86-64 4-level page-table walker.
//!
//! Given a root (a CR3 value), it enumerates the leaf mappings (VA, PA, 4 KiB / 2 MiB / 1 GiB,
//! effective permissions) and the page-table frames of every level. Guest memory is untrusted:
//! non-present entries are skipped, table pointers outside RAM are rejected and counted,
//! recursive entries (a table pointing to one of its ancestors, like a self-map) are rejected,
//! and every `(frame, level)` is read at most once per [`Visited`] set, so the total work of
//! any number of walks sharing one [`Visited`] is bounded by `4 x frames x 512` entries. The
//! walker never panics on any memory content.

use crate::mem::{frame_count, read_entries, FrameSet, Gfn, PhysMem};
use kscope_guest::abi::layout::PAGE_SIZE;
use serde::Serialize;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_XD: u64 = 1 << 63;
/// Physical-address bits of an entry (MAXPHYADDR 52).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// First virtual address of the kernel (upper) half of the canonical address space.
pub const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// Size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PageSize {
    /// 4 KiB (a PT entry).
    Size4K,
    /// 2 MiB (a PD entry with PS).
    Size2M,
    /// 1 GiB (a PDPT entry with PS).
    Size1G,
}

impl PageSize {
    /// Bytes covered.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size2M => 2 << 20,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// Frames covered.
    pub const fn frames(self) -> u64 {
        self.bytes() / PAGE_SIZE
    }
}

/// Effective permissions of a leaf (combined over all levels as the MMU does) and its own
/// accessed/dirty/global bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PteFlags {
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible (U/S = 1) at every level.
    pub user: bool,
    /// Not executable (XD set at some level).
    pub nx: bool,
    /// Accessed bit of the leaf.
    pub accessed: bool,
    /// Dirty bit of the leaf.
    pub dirty: bool,
    /// Global bit of the leaf.
    pub global: bool,
}

/// One leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Canonical virtual address of the first byte.
    pub va: u64,
    /// Physical address of the first byte (may lie beyond RAM, e.g. MMIO).
    pub pa: u64,
    /// Size of the mapping.
    pub size: PageSize,
    /// Effective flags.
    pub flags: PteFlags,
}

/// A page-table frame and its level (4 = PML4, 3 = PDPT, 2 = PD, 1 = PT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFrame {
    /// The frame.
    pub gfn: Gfn,
    /// Its level.
    pub level: u8,
}

/// What the walker reports, in walk order (a table before the entries below it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEvent {
    /// A page-table frame (the root first).
    Table(TableFrame),
    /// A leaf mapping.
    Leaf(Mapping),
}

/// Counters of one or more walks (anomalies say how much garbage was tolerated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WalkStats {
    /// Page-table frames read.
    pub tables: u64,
    /// Leaf mappings reported.
    pub leaves: u64,
    /// Table pointers outside RAM (skipped).
    pub table_out_of_range: u64,
    /// Malformed entries (PS at the PML4 level; skipped).
    pub malformed: u64,
    /// Entries pointing to an ancestor table (recursive/self maps; skipped).
    pub loops: u64,
    /// Tables already walked through another entry or root (skipped: shared subtrees).
    pub shared: u64,
    /// Frames used as tables at more than one level.
    pub level_aliases: u64,
    /// Frames that could not be read.
    pub read_errors: u64,
}

impl WalkStats {
    /// Add `o` into `self`.
    pub fn add(&mut self, o: &WalkStats) {
        self.tables += o.tables;
        self.leaves += o.leaves;
        self.table_out_of_range += o.table_out_of_range;
        self.malformed += o.malformed;
        self.loops += o.loops;
        self.shared += o.shared;
        self.level_aliases += o.level_aliases;
        self.read_errors += o.read_errors;
    }
}

/// Errors of the walker.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// The root is not a frame of guest RAM.
    #[error(
        "page-table root {root:#x} is outside guest RAM ({size:#x} bytes): pass a CR3 of this \
         guest (the descriptor or vCPU state is stale or corrupt)"
    )]
    RootOutOfRange {
        /// The root given.
        root: u64,
        /// Size of guest RAM.
        size: u64,
    },
}

/// The `(frame, level)` pairs already walked; share one between walks of the same memory so
/// that shared subtrees (e.g. the kernel half of every process) are read once.
#[derive(Clone, Debug)]
pub struct Visited {
    levels: [FrameSet; 4],
}

impl Visited {
    /// An empty set for a memory of `frames` frames.
    pub fn new(frames: u64) -> Self {
        Visited {
            levels: std::array::from_fn(|_| FrameSet::new(frames)),
        }
    }

    /// True if `gfn` was walked as a table of `level` (1..=4).
    pub fn contains(&self, gfn: Gfn, level: u8) -> bool {
        (1..=4).contains(&level) && self.levels[usize::from(level - 1)].contains(gfn)
    }

    fn insert(&mut self, gfn: Gfn, level: u8) -> bool {
        let aliased = (1..=4u8).any(|l| l != level && self.contains(gfn, l));
        self.levels[usize::from(level - 1)].insert(gfn);
        aliased
    }
}

/// Sign-extend bit 47 of a virtual address.
pub const fn canonical(va: u64) -> u64 {
    if va & (1 << 47) != 0 {
        va | 0xffff_0000_0000_0000
    } else {
        va & 0x0000_ffff_ffff_ffff
    }
}

/// Walk the page tables under `cr3` (low 12 bits and bits above 51 ignored), reporting each
/// table and leaf to `visit`. Tables already in `visited` are not walked again.
pub fn walk<M: PhysMem + ?Sized>(
    mem: &M,
    cr3: u64,
    visited: &mut Visited,
    visit: &mut dyn FnMut(WalkEvent),
) -> Result<WalkStats, WalkError> {
    let frames = frame_count(mem);
    let root = (cr3 & ADDR_MASK) / PAGE_SIZE;
    if root >= frames {
        return Err(WalkError::RootOutOfRange {
            root: cr3,
            size: mem.size(),
        });
    }
    let mut w = Walker {
        mem,
        frames,
        visited,
        visit,
        stats: WalkStats::default(),
    };
    if w.visited.contains(root, 4) {
        w.stats.shared += 1;
        return Ok(w.stats);
    }
    if w.visited.insert(root, 4) {
        w.stats.level_aliases += 1;
    }
    (w.visit)(WalkEvent::Table(TableFrame {
        gfn: root,
        level: 4,
    }));
    let inherited = PteFlags {
        writable: true,
        user: true,
        nx: false,
        ..PteFlags::default()
    };
    let mut path = [root, 0, 0, 0];
    w.table(root, 4, 0, inherited, &mut path);
    Ok(w.stats)
}

/// Walk `cr3` with a fresh [`Visited`] and collect everything.
pub fn walk_all<M: PhysMem + ?Sized>(
    mem: &M,
    cr3: u64,
) -> Result<(Vec<TableFrame>, Vec<Mapping>, WalkStats), WalkError> {
    let mut tables = Vec::new();
    let mut leaves = Vec::new();
    let mut visited = Visited::new(frame_count(mem));
    let stats = walk(mem, cr3, &mut visited, &mut |e| match e {
        WalkEvent::Table(t) => tables.push(t),
        WalkEvent::Leaf(m) => leaves.push(m),
    })?;
    Ok((tables, leaves, stats))
}

/// Translate one virtual address through the tables under `cr3`: the physical address and
/// the leaf that maps it, or `None` if it is not mapped (or the tables are broken).
pub fn translate<M: PhysMem + ?Sized>(
    mem: &M,
    cr3: u64,
    va: u64,
) -> Result<Option<(u64, Mapping)>, WalkError> {
    let frames = frame_count(mem);
    let mut table = (cr3 & ADDR_MASK) / PAGE_SIZE;
    if table >= frames {
        return Err(WalkError::RootOutOfRange {
            root: cr3,
            size: mem.size(),
        });
    }
    let mut flags = PteFlags {
        writable: true,
        user: true,
        nx: false,
        ..PteFlags::default()
    };
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let idx = (va >> shift) & 511;
        let Ok(e) = crate::mem::read_u64(mem, table * PAGE_SIZE + idx * 8) else {
            return Ok(None);
        };
        if e & PTE_P == 0 {
            return Ok(None);
        }
        flags = combine(flags, e);
        let leaf_size = match level {
            1 => Some(PageSize::Size4K),
            2 if e & PTE_PS != 0 => Some(PageSize::Size2M),
            3 if e & PTE_PS != 0 => Some(PageSize::Size1G),
            4 if e & PTE_PS != 0 => return Ok(None),
            _ => None,
        };
        if let Some(size) = leaf_size {
            let base = e & ADDR_MASK & !(size.bytes() - 1);
            let off = va & (size.bytes() - 1);
            let m = Mapping {
                va: canonical(va & !(size.bytes() - 1)),
                pa: base,
                size,
                flags,
            };
            return Ok(Some((base + off, m)));
        }
        table = (e & ADDR_MASK) / PAGE_SIZE;
        if table >= frames {
            return Ok(None);
        }
    }
    Ok(None)
}

fn combine(inherited: PteFlags, e: u64) -> PteFlags {
    PteFlags {
        writable: inherited.writable && e & PTE_RW != 0,
        user: inherited.user && e & PTE_US != 0,
        nx: inherited.nx || e & PTE_XD != 0,
        accessed: e & PTE_A != 0,
        dirty: e & PTE_D != 0,
        global: e & PTE_G != 0,
    }
}

struct Walker<'a, M: PhysMem + ?Sized> {
    mem: &'a M,
    frames: u64,
    visited: &'a mut Visited,
    visit: &'a mut dyn FnMut(WalkEvent),
    stats: WalkStats,
}

impl<M: PhysMem + ?Sized> Walker<'_, M> {
    /// Walk table `gfn` at `level` whose first entry maps `va_base`; `path[..5-level]` holds
    /// the tables from the root down to this one.
    fn table(
        &mut self,
        gfn: Gfn,
        level: u8,
        va_base: u64,
        inherited: PteFlags,
        path: &mut [Gfn; 4],
    ) {
        let mut entries = [0u64; 512];
        if read_entries(self.mem, gfn, &mut entries).is_err() {
            self.stats.read_errors += 1;
            return;
        }
        self.stats.tables += 1;
        let shift = 12 + 9 * u32::from(level - 1);
        let depth = usize::from(4 - level);
        for (i, &e) in entries.iter().enumerate() {
            if e & PTE_P == 0 {
                continue;
            }
            let va = canonical(va_base | ((i as u64) << shift));
            let flags = combine(inherited, e);
            let leaf_size = match level {
                1 => Some(PageSize::Size4K),
                2 if e & PTE_PS != 0 => Some(PageSize::Size2M),
                3 if e & PTE_PS != 0 => Some(PageSize::Size1G),
                4 if e & PTE_PS != 0 => {
                    self.stats.malformed += 1;
                    continue;
                }
                _ => None,
            };
            if let Some(size) = leaf_size {
                let pa = e & ADDR_MASK & !(size.bytes() - 1);
                self.stats.leaves += 1;
                (self.visit)(WalkEvent::Leaf(Mapping {
                    va,
                    pa,
                    size,
                    flags,
                }));
                continue;
            }
            let child = (e & ADDR_MASK) / PAGE_SIZE;
            let child_level = level - 1;
            if child >= self.frames {
                self.stats.table_out_of_range += 1;
                continue;
            }
            if path[..=depth].contains(&child) {
                self.stats.loops += 1;
                continue;
            }
            if self.visited.contains(child, child_level) {
                self.stats.shared += 1;
                continue;
            }
            if self.visited.insert(child, child_level) {
                self.stats.level_aliases += 1;
            }
            (self.visit)(WalkEvent::Table(TableFrame {
                gfn: child,
                level: child_level,
            }));
            path[depth + 1] = child;
            self.table(child, child_level, va, flags, path);
        }
    }
}

#[cfg(test)]
#[path = "pagewalk_tests.rs"]
mod tests;
