//! The Linux guest profile: colors real Linux memory the way crash-dump tools read it.
//!
//! Everything is derived from the image itself, per kernel, nothing per build is compiled in:
//!
//! - **VMCOREINFO** (the note qemu's `vmcoreinfo` device or kdump puts in the core file):
//!   `OSRELEASE`; `SYMBOL(init_top_pgt)` and `NUMBER(phys_base)` (the kernel root and the image
//!   mapping); `SYMBOL(mem_section)`, `SIZE(mem_section)`, `NUMBER(SECTION_SIZE_BITS)` (where
//!   each frame's `struct page` is); `SIZE(page)` and `OFFSET(page.flags|_refcount|mapping|
//!   _mapcount|private|compound_head)`; `NUMBER(PG_lru|PG_slab|PG_head_mask)`;
//!   `NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)`, `LENGTH(zone.free_area)` (free blocks);
//!   `SYMBOL(node_data)`/`SYMBOL(contig_page_data)` + `OFFSET(pglist_data.node_start_pfn|
//!   node_spanned_pages)` (the end of RAM).
//! - **BTF** found in the kernel's own read-only data ([`btf`]): `PG_reserved` (enum
//!   `pageflags`), `page.index`, `address_space.host`, `inode.i_mode`, `inode.i_mapping`.
//! - **x86-64 architecture facts**: the kernel image is mapped at `0xffffffff80000000`
//!   (`__START_KERNEL_map`, fixed by the x86-64 ABI); 4-level paging (`pgtable_l5_enabled=0`,
//!   checked). The direct map is *found*, not assumed: it is the largest set of kernel leaves
//!   with one constant virtual-minus-physical offset.
//!
//! What each frame is then comes from two sources the colorer combines ([`crate::color`]):
//! the page tables (walked from `init_top_pgt` and from every process PGD, found as frames
//! whose kernel half equals `init_top_pgt`'s) give page-table frames, user code/data by NX
//! and kernel code/data by NX in the kernel's image mapping; the `struct page` array gives
//! free buddy blocks, slab and reserved frames (kernel data), anonymous memory, and page cache
//! per `address_space`, executable when its inode is a regular file with an execute bit.

pub mod btf;
pub mod elfcore;
pub mod truth;
pub mod vmcoreinfo;

use crate::mem::{frame_count, read_u64, FrameSet, Gfn, MemError, PhysMem};
use crate::pagewalk::{translate, walk, Mapping, Visited, WalkError, WalkEvent, KERNEL_HALF};
use crate::profile::{
    FileInfo, FileKind, FrameRoles, GuestProfile, ImageRange, ProcessRoot, ProfileError,
};
use btf::{Btf, BtfError};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use vmcoreinfo::{Vmcoreinfo, VmcoreinfoError};

pub use elfcore::{ElfCore, ElfCoreError};

/// `__START_KERNEL_map`: where x86-64 Linux maps its image (an ABI constant since 2.6).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Kernel versions whose `struct page` conventions this profile reads: `page_type` in
/// `_mapcount` with `PAGE_BUDDY_MAPCOUNT_VALUE` (4.18) up to the page-type re-encoding of 6.9.
pub const SUPPORTED: &str = "4.18 to 6.8";

/// Errors of the Linux profile.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// The core file is unreadable or foreign.
    #[error(transparent)]
    Elf(#[from] ElfCoreError),
    /// VMCOREINFO missing or incomplete.
    #[error(transparent)]
    Vmcoreinfo(#[from] VmcoreinfoError),
    /// BTF missing or incomplete.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// A guest read failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A page-table walk failed.
    #[error(transparent)]
    Walk(#[from] WalkError),
    /// A kernel this profile does not read.
    #[error("unknown kernel version {release}: {why}; the Linux profile reads kernels {SUPPORTED} and does not guess the layout of others")]
    Unsupported {
        /// OSRELEASE.
        release: String,
        /// Why.
        why: String,
    },
    /// The coloring pass failed.
    #[error(transparent)]
    Color(#[from] crate::ColorError),
    /// The image contradicts what VMCOREINFO says.
    #[error(
        "the image contradicts its VMCOREINFO: {0}; the image is corrupt or from another kernel"
    )]
    Inconsistent(String),
}

/// The layout of this kernel, as derived from VMCOREINFO and BTF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// OSRELEASE.
    pub release: String,
    /// `phys_base` (the image's physical displacement, two's complement).
    pub phys_base: u64,
    /// Guest-physical address of `init_top_pgt`.
    pub kernel_root: u64,
    /// Virtual minus physical offset of the direct map (`page_offset_base`).
    pub direct_map: u64,
    /// End of RAM (bytes) per the kernel's nodes.
    pub ram_end: u64,
    /// `sizeof(struct page)`.
    pub page_size: u64,
    /// Offsets in `struct page`: flags, _refcount, mapping, _mapcount, private,
    /// compound_head, index.
    pub off: [u64; 7],
    /// Bit numbers: PG_lru, PG_slab, PG_reserved; PG_head mask.
    pub pg: [u32; 3],
    /// `PG_head` mask.
    pub head_mask: u64,
    /// `_mapcount` value of a free buddy block's first page.
    pub buddy_value: i32,
    /// Number of buddy orders (`MAX_ORDER`).
    pub max_order: u64,
    /// `address_space.host`, `inode.i_mode`, `inode.i_mapping`, `inode.i_ino`.
    pub fs_off: [u64; 4],
    /// Where the BTF was found (guest-physical) and how many types it has.
    pub btf_at: (u64, usize),
}

/// The kernel's version as (major, minor) from OSRELEASE.
fn version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Check that `release` is a kernel this profile reads.
pub fn check_version(release: &str) -> Result<(), LinuxError> {
    let unsupported = |why: &str| LinuxError::Unsupported {
        release: release.to_string(),
        why: why.to_string(),
    };
    let v =
        version(release).ok_or_else(|| unsupported("OSRELEASE does not start with a version"))?;
    if v < (4, 18) {
        return Err(unsupported(
            "before 4.18 free pages were not marked by page_type",
        ));
    }
    if v >= (6, 9) {
        return Err(unsupported(
            "6.9 re-encoded page_type (PGTY_*) and moved page-table marks",
        ));
    }
    Ok(())
}

fn need_hex(v: &Vmcoreinfo, key: &str) -> Result<u64, LinuxError> {
    Ok(v.hex(key)?)
}

/// Guest-physical address of a kernel-image virtual address.
fn image_pa(va: u64, phys_base: u64) -> u64 {
    va.wrapping_sub(START_KERNEL_MAP).wrapping_add(phys_base)
}

/// The largest constant-offset linear mapping among the leaves of `root` (the direct map),
/// and the leaves of the kernel image mapping.
fn find_direct_map<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
) -> Result<(u64, Vec<Mapping>), LinuxError> {
    let mut by_offset: HashMap<u64, u64> = HashMap::new();
    let mut image = Vec::new();
    let mut visited = Visited::new(frame_count(mem));
    walk(mem, root, &mut visited, &mut |e| {
        if let WalkEvent::Leaf(m) = e {
            if m.va >= KERNEL_HALF && m.va < START_KERNEL_MAP && m.pa < mem.size() {
                *by_offset.entry(m.va.wrapping_sub(m.pa)).or_default() += m.size.bytes();
            } else if m.va >= START_KERNEL_MAP && m.pa < mem.size() {
                image.push(m);
            }
        }
    })?;
    let (off, bytes) = by_offset
        .into_iter()
        .max_by_key(|&(_, b)| b)
        .ok_or_else(|| LinuxError::Inconsistent("the kernel root maps nothing".into()))?;
    if bytes < mem.size() / 2 {
        return Err(LinuxError::Inconsistent(format!(
            "no direct map: the largest linear kernel mapping covers {bytes} bytes of {}",
            mem.size()
        )));
    }
    Ok((off, image))
}

/// Per-frame facts read from `struct page`.
#[derive(Clone, Copy, Debug, Default)]
struct PageFacts {
    flags: u64,
    refcount: i32,
    mapcount: i32,
    mapping: u64,
    private: u64,
    head: u64,
    index: u64,
    /// The coded `mem_map` of the frame's section (VA of frame 0's `struct page`).
    base: u64,
}

/// A derived Linux profile: everything read at [`LinuxProfile::open`].
pub struct LinuxProfile {
    /// The kernel's layout.
    pub layout: Layout,
    roots: Vec<ProcessRoot>,
    files: Vec<FileInfo>,
    file_pages: HashMap<u64, Vec<(u64, Gfn)>>,
    in_use: FrameSet,
    roles: FrameRoles,
    /// Frames whose `struct page` could not be read.
    pub unreadable_frames: u64,
    /// Image-mapping ranges whose frames the kernel has freed (ignored by the walk).
    stale_image: Vec<Range<u64>>,
}

/// Virtual ranges of the kernel image mapping whose frames are no longer reserved: parts of
/// the image the kernel freed after boot (the text/rodata and rodata/data gaps, init memory)
/// stay mapped there when page-table isolation is off, but their frames are reused; that
/// alias says nothing about their role.
fn stale_aliases(
    leaves: &[Mapping],
    facts: &[Option<PageFacts>],
    pg_reserved: u32,
) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for m in leaves {
        for i in 0..m.size.frames() {
            let g = m.pa / 4096 + i;
            let reserved = facts
                .get(g as usize)
                .copied()
                .flatten()
                .is_some_and(|f| f.flags & (1 << pg_reserved) != 0);
            if reserved {
                continue;
            }
            let va = m.va + i * 4096;
            match out.last_mut() {
                Some(r) if r.end == va => r.end = va + 4096,
                _ => out.push(va..va + 4096),
            }
        }
    }
    out
}

/// Read VMCOREINFO-level facts and the end of RAM (to restrict an image to guest RAM before
/// coloring, see [`ElfCore::set_limit`]).
pub fn ram_end<M: PhysMem + ?Sized>(mem: &M, v: &Vmcoreinfo) -> Result<u64, LinuxError> {
    check_version(v.release())?;
    let phys_base = v.number("phys_base")? as u64;
    let root = image_pa(root_symbol(v)?, phys_base);
    let pgdats: Vec<u64> = if v.has("SYMBOL(node_data)") {
        let arr = image_pa(need_hex(v, "SYMBOL(node_data)")?, phys_base);
        let n = v.length("node_data")?.min(1 << 12);
        let mut out = Vec::new();
        for i in 0..n {
            let p = read_u64(mem, arr + 8 * i)?;
            if p != 0 {
                out.push(p);
            }
        }
        out
    } else {
        vec![need_hex(v, "SYMBOL(contig_page_data)")?]
    };
    let start_off = v.offset("pglist_data.node_start_pfn")?;
    let span_off = v.offset("pglist_data.node_spanned_pages")?;
    let mut end = 0u64;
    for va in pgdats {
        let pa = kva(mem, root, phys_base, va)?;
        let start = read_u64(mem, pa + start_off)?;
        let span = read_u64(mem, pa + span_off)?;
        end = end.max(start.saturating_add(span).saturating_mul(4096));
    }
    if end == 0 {
        return Err(LinuxError::Inconsistent(
            "no memory node spans any frame".into(),
        ));
    }
    Ok(end)
}

fn root_symbol(v: &Vmcoreinfo) -> Result<u64, LinuxError> {
    if v.number("pgtable_l5_enabled").unwrap_or(0) != 0 {
        return Err(LinuxError::Unsupported {
            release: v.release().to_string(),
            why: "5-level paging is enabled; the walker reads 4 levels".into(),
        });
    }
    Ok(v.symbol("init_top_pgt")
        .or_else(|_| v.symbol("swapper_pg_dir"))?)
}

/// Translate a kernel virtual address (image mapping by formula, others through the tables).
fn kva<M: PhysMem + ?Sized>(
    mem: &M,
    root: u64,
    phys_base: u64,
    va: u64,
) -> Result<u64, LinuxError> {
    if va >= START_KERNEL_MAP {
        return Ok(image_pa(va, phys_base));
    }
    translate(mem, root, va)?
        .map(|(pa, _)| pa)
        .ok_or_else(|| LinuxError::Inconsistent(format!("kernel address {va:#x} is not mapped")))
}

/// Find the kernel's BTF in its image: scan from `_stext` for a valid header.
fn find_btf<M: PhysMem + ?Sized>(mem: &M, from: u64) -> Result<(u64, Btf), LinuxError> {
    let first = from / 4096;
    let last = (first + (256 << 8)).min(frame_count(mem)); // at most 256 MiB of image
    for g in first..last {
        let Some(p) = mem.page(g) else { continue };
        // Magic 0xeB9F, version 1, flags 0, at a 4-byte boundary; two candidates per word.
        const M: u64 = 0x0001_eb9f;
        let hits = p.chunks_exact(8).enumerate().filter_map(|(i, w)| {
            let x = u64::from_le_bytes(w.try_into().unwrap_or_default());
            if x & 0xffff_ffff == M {
                Some(8 * i)
            } else if x >> 32 == M {
                Some(8 * i + 4)
            } else {
                None
            }
        });
        for off in hits.collect::<Vec<_>>() {
            let at = g * 4096 + off as u64;
            let mut hdr = [0u8; 24];
            if mem.read(at, &mut hdr).is_err() {
                continue;
            }
            let Some(total) = btf::header_len(&hdr) else {
                continue;
            };
            if total > (64 << 20) {
                continue;
            }
            let mut buf = vec![0u8; total];
            if mem.read(at, &mut buf).is_err() {
                continue;
            }
            if let Ok(b) = Btf::parse(&buf) {
                if b.struct_size("page").is_ok() {
                    return Ok((at, b));
                }
            }
        }
    }
    Err(BtfError::NotFound(format!("scanned {} MiB from _stext", (last - first) >> 8)).into())
}

impl LinuxProfile {
    /// Derive the layout and read every frame's `struct page`. `vcpu_cr3s` (from the image's
    /// CPU notes) are tried as process roots too.
    pub fn open<M: PhysMem + ?Sized>(
        mem: &M,
        v: &Vmcoreinfo,
        vcpu_cr3s: &[u64],
    ) -> Result<Self, LinuxError> {
        let release = v.release().to_string();
        check_version(&release)?;
        // The caller restricted `mem` to guest RAM (see [`LinuxImage::from_core`]).
        let ram_end = mem.size();
        let phys_base = v.number("phys_base")? as u64;
        let kernel_root = image_pa(root_symbol(v)?, phys_base);
        if kernel_root >= mem.size() {
            return Err(LinuxError::Inconsistent(format!(
                "init_top_pgt at {kernel_root:#x} is beyond RAM"
            )));
        }
        let (direct_map, image_leaves) = find_direct_map(mem, kernel_root)?;
        let stext = image_pa(v.symbol("_stext")?, phys_base);
        let (btf_pa, btf) = find_btf(mem, stext)?;
        let page_size = v.size("page")?;
        let off = [
            v.offset("page.flags")?,
            v.offset("page._refcount")?,
            v.offset("page.mapping")?,
            v.offset("page._mapcount")?,
            v.offset("page.private")?,
            v.offset("page.compound_head")?,
            btf.offset("page", "index")?,
        ];
        if page_size == 0 || 4096 % page_size != 0 {
            return Err(LinuxError::Unsupported {
                release: v.release().to_string(),
                why: format!("SIZE(page)={page_size} does not divide the page size"),
            });
        }
        if let Some(&o) = off.iter().find(|&&o| o + 4 > page_size) {
            return Err(LinuxError::Inconsistent(format!(
                "a struct page field at {o} is outside SIZE(page)={page_size}"
            )));
        }
        let pg_reserved = btf.enumerator("PG_reserved")?;
        let layout = Layout {
            release,
            phys_base,
            kernel_root,
            direct_map,
            ram_end,
            page_size,
            off,
            pg: [
                v.number("PG_lru")? as u32,
                v.number("PG_slab")? as u32,
                pg_reserved as u32,
            ],
            head_mask: v.number("PG_head_mask")? as u64,
            buddy_value: v.number("PAGE_BUDDY_MAPCOUNT_VALUE")? as i32,
            max_order: v.length("zone.free_area")?,
            fs_off: [
                btf.offset("address_space", "host")?,
                btf.offset("inode", "i_mode")?,
                btf.offset("inode", "i_mapping")?,
                btf.offset("inode", "i_ino")?,
            ],
            btf_at: (btf_pa, btf.len()),
        };
        if layout.pg.iter().any(|&b| b >= 64) || !layout.head_mask.is_power_of_two() {
            return Err(LinuxError::Inconsistent(
                "a PG_* bit number is out of range".into(),
            ));
        }
        let facts = read_pages(mem, v, &layout)?;
        let mut p = LinuxProfile {
            layout,
            roots: Vec::new(),
            files: Vec::new(),
            file_pages: HashMap::new(),
            in_use: FrameSet::new(frame_count(mem)),
            roles: FrameRoles {
                kernel: FrameSet::new(frame_count(mem)),
                anon: FrameSet::new(frame_count(mem)),
                page_table: FrameSet::new(frame_count(mem)),
            },
            unreadable_frames: 0,
            stale_image: Vec::new(),
        };
        let counted = p.classify(mem, &facts);
        p.stale_image = stale_aliases(&image_leaves, &facts, p.layout.pg[2]);
        p.find_roots(mem, &counted, vcpu_cr3s);
        Ok(p)
    }

    /// Number of process roots found.
    pub fn processes_len(&self) -> usize {
        self.roots.len()
    }

    /// Classify every frame; returns the frames with a reference count (live allocations).
    fn classify<M: PhysMem + ?Sized>(&mut self, mem: &M, facts: &[Option<PageFacts>]) -> FrameSet {
        let l = &self.layout;
        let frames = facts.len() as u64;
        let bit = |f: u64, b: u32| f & (1u64 << b) != 0;
        let mut free = FrameSet::new(frames);
        // Free buddy blocks: the first page carries the buddy type and the order.
        for (g, f) in facts.iter().enumerate() {
            if let Some(f) = f {
                if f.mapcount == l.buddy_value && f.private < l.max_order {
                    for t in g as u64..(g as u64 + (1 << f.private)).min(frames) {
                        free.insert(t);
                    }
                }
            }
        }
        let mut counted = FrameSet::new(frames);
        let mut inode_kind: HashMap<u64, Option<(FileKind, u64)>> = HashMap::new();
        let mut cache: BTreeMap<u64, Vec<(u64, Gfn)>> = BTreeMap::new();
        for (g, f) in facts.iter().enumerate() {
            let g = g as u64;
            let Some(f) = f else {
                self.unreadable_frames += 1;
                continue;
            };
            if free.contains(g) {
                continue;
            }
            // A tail page takes the head page's identity.
            let h = if f.head & 1 == 1 {
                let pfn = self.head_pfn(f);
                facts.get(pfn as usize).copied().flatten().unwrap_or(*f)
            } else {
                *f
            };
            let tail = f.head & 1 == 1;
            // Only buddy blocks are free. A page with no count outside a block may sit on a
            // per-CPU free list, or be a tail of a multi-page allocation made without
            // __GFP_COMP (live data, counted in its first page): not guessed, kept in use.
            self.in_use.insert(g);
            if f.refcount > 0 {
                counted.insert(g);
            }
            if bit(h.flags, l.pg[1]) || bit(h.flags, l.pg[2]) {
                self.roles.kernel.insert(g); // slab, reserved
            } else if h.mapping & 3 == 1 || h.mapping & 3 == 3 {
                self.roles.anon.insert(g); // anonymous (3: KSM)
            } else if h.mapping & 3 == 0 && h.mapping >= KERNEL_HALF {
                let kind = *inode_kind
                    .entry(h.mapping)
                    .or_insert_with(|| file_kind(mem, l, h.mapping));
                if let Some((_, _)) = kind {
                    let idx = h.index
                        + if tail {
                            g.saturating_sub(self.head_pfn(f))
                        } else {
                            0
                        };
                    cache.entry(h.mapping).or_default().push((idx, g));
                }
            }
        }
        for (mapping, mut pages) in cache {
            let Some(Some((kind, ino))) = inode_kind.get(&mapping).copied() else {
                continue;
            };
            pages.sort_unstable();
            self.files.push(FileInfo {
                ino: ino as u32,
                kind,
                size: pages.last().map_or(0, |p| (p.0 + 1) * 4096),
                name: format!("inode {ino} (address_space {mapping:#x})"),
                cache_root: mapping,
                nr_cached: pages.len() as u64,
            });
            self.file_pages.insert(mapping, pages);
        }
        counted
    }

    /// Frame of a tail page's head (a compound page never crosses a section).
    fn head_pfn(&self, f: &PageFacts) -> u64 {
        (f.head - 1).wrapping_sub(f.base) / self.layout.page_size
    }

    /// Process PGDs: live frames (`counted`) whose kernel half equals the kernel root's.
    fn find_roots<M: PhysMem + ?Sized>(&mut self, mem: &M, counted: &FrameSet, vcpu_cr3s: &[u64]) {
        let mut kernel = [0u64; 512];
        if crate::mem::read_entries(mem, self.layout.kernel_root / 4096, &mut kernel).is_err() {
            return;
        }
        let upper = &kernel[256..];
        let mut seen = FrameSet::new(counted.frames());
        let candidates = counted
            .iter()
            .filter(|&g| !self.roles.kernel.contains(g) && !self.roles.anon.contains(g))
            .chain(vcpu_cr3s.iter().map(|c| (c & 0x000f_ffff_ffff_f000) / 4096));
        let mut e = [0u64; 512];
        for g in candidates {
            if g == self.layout.kernel_root / 4096 || seen.contains(g) {
                continue;
            }
            seen.insert(g);
            let Some(p) = mem.page(g) else { continue };
            // Cheap check first: the last kernel entry (the image mapping) must match.
            let last = u64::from_le_bytes(p[4088..4096].try_into().unwrap_or_default());
            if last != kernel[511] {
                continue;
            }
            if crate::mem::read_entries(mem, g, &mut e).is_err() || e[256..] != *upper {
                continue;
            }
            self.roots.push(ProcessRoot {
                pid: self.roots.len() as u32 + 1,
                cr3: g * 4096,
                name: format!("pgd@{:#x}", g * 4096),
            });
        }
    }
}

/// Kind and inode number of the file behind `mapping` (an `address_space`), if it is one.
fn file_kind<M: PhysMem + ?Sized>(mem: &M, l: &Layout, mapping: u64) -> Option<(FileKind, u64)> {
    let dm = |va: u64| va.checked_sub(l.direct_map).filter(|&pa| pa < mem.size());
    let host = read_u64(mem, dm(mapping)? + l.fs_off[0]).ok()?;
    let inode = dm(host)?;
    // The inode must point back at this address_space.
    if read_u64(mem, inode + l.fs_off[2]).ok()? != mapping {
        return None;
    }
    let mut m = [0u8; 2];
    mem.read(inode + l.fs_off[1], &mut m).ok()?;
    let mode = u16::from_le_bytes(m);
    let exec = mode & 0o170000 == 0o100000 && mode & 0o111 != 0;
    let ino = read_u64(mem, inode + l.fs_off[3]).unwrap_or(0);
    Some((if exec { FileKind::Exec } else { FileKind::Data }, ino))
}

/// Read every frame's `struct page` through `mem_section`.
fn read_pages<M: PhysMem + ?Sized>(
    mem: &M,
    v: &Vmcoreinfo,
    l: &Layout,
) -> Result<Vec<Option<PageFacts>>, LinuxError> {
    let frames = frame_count(mem).min(l.ram_end / 4096);
    let sbits = v.number("SECTION_SIZE_BITS")?;
    if !(15..=40).contains(&sbits) {
        return Err(LinuxError::Inconsistent(format!(
            "SECTION_SIZE_BITS={sbits}"
        )));
    }
    let per_section = 1u64 << (sbits - 12);
    let ms_size = v.size("mem_section")?;
    let map_off = v.offset("mem_section.section_mem_map")?;
    let ms = v.symbol("mem_section")?;
    if ms_size == 0 || ms_size > 4096 {
        return Err(LinuxError::Inconsistent(format!(
            "SIZE(mem_section)={ms_size}"
        )));
    }
    // SPARSEMEM_EXTREME: `mem_section` points (through the direct map) to an array of roots,
    // each a page of sections; otherwise it is a static array in the kernel image.
    let extreme = ms < START_KERNEL_MAP;
    let per_root = 4096 / ms_size;
    let pa_of = |va: u64| kva(mem, l.kernel_root, l.phys_base, va);
    let mut out = vec![None; frames as usize];
    let mut leaf: Option<(u64, u64, u64)> = None; // (va, size, pa) of the last translation
    let mut buf = vec![0u8; l.page_size as usize];
    for s in 0..frames.div_ceil(per_section) {
        let sec_va = if extreme {
            let root = read_u64(mem, pa_of(ms + 8 * (s / per_root))?)?;
            if root == 0 {
                continue;
            }
            root + (s % per_root) * ms_size
        } else {
            ms + s * ms_size
        };
        let coded = read_u64(mem, pa_of(sec_va)? + map_off)?;
        // Bit 0: present. The low bits are flags (SECTION_MAP_LAST_BIT <= 6 in every kernel).
        if coded & 1 == 0 {
            continue;
        }
        let base = coded & !0x3f;
        for g in s * per_section..((s + 1) * per_section).min(frames) {
            let va = base.wrapping_add(g * l.page_size);
            // SIZE(page) divides 4096 (checked at open): a struct page never straddles a page.
            let pa = match leaf {
                Some((lva, size, lpa)) if va >= lva && va - lva < size => lpa + (va - lva),
                _ => match translate(mem, l.kernel_root, va)? {
                    Some((pa, m)) => {
                        leaf = Some((m.va, m.size.bytes(), m.pa));
                        pa
                    }
                    None => continue,
                },
            };
            if mem.read(pa, &mut buf).is_err() {
                continue;
            }
            let r64 = |o: u64| {
                let o = o as usize;
                buf.get(o..o + 8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            };
            let r32 = |o: u64| {
                let o = o as usize;
                buf.get(o..o + 4)
                    .map_or(0, |b| i32::from_le_bytes(b.try_into().unwrap_or_default()))
            };
            out[g as usize] = Some(PageFacts {
                flags: r64(l.off[0]),
                refcount: r32(l.off[1]),
                mapping: r64(l.off[2]),
                mapcount: r32(l.off[3]),
                private: r64(l.off[4]),
                head: r64(l.off[5]),
                index: r64(l.off[6]),
                base,
            });
        }
    }
    Ok(out)
}

/// A Linux memory image opened for coloring: guest RAM (restricted to the kernel's nodes, so
/// device memory in the dump such as a frame buffer is left out) and its derived profile.
pub struct LinuxImage {
    /// The memory.
    pub core: ElfCore,
    /// The profile.
    pub profile: LinuxProfile,
    /// CR3 of each vCPU at the dump (walked as extra roots).
    pub vcpu_cr3s: Vec<u64>,
}

impl LinuxImage {
    /// Open an ELF core file of a Linux guest.
    pub fn open(path: &std::path::Path) -> Result<Self, LinuxError> {
        Self::from_core(ElfCore::open(path)?)
    }

    /// Take an opened core file.
    pub fn from_core(mut core: ElfCore) -> Result<Self, LinuxError> {
        let v = Vmcoreinfo::parse(core.vmcoreinfo().ok_or(VmcoreinfoError::Missing)?);
        // Guest RAM: the segments that overlap the kernel's nodes (firmware-reserved frames at
        // the end of RAM included: the kernel has `struct page`s for them), not device memory.
        let end = ram_end(&core, &v)?;
        let ram = core
            .segments()
            .iter()
            .filter(|s| s.paddr < end)
            .map(|s| s.paddr + s.len)
            .max()
            .unwrap_or(end);
        core.set_limit(ram);
        let vcpu_cr3s = core.vcpu_cr3s();
        let profile = LinuxProfile::open(&core, &v, &vcpu_cr3s)?;
        Ok(LinuxImage {
            core,
            profile,
            vcpu_cr3s,
        })
    }

    /// Every page-table frame reachable from the roots: (frame, level 4..1, reached from the
    /// kernel root). Used to explain page-table accuracy (which levels the kernel flags).
    pub fn table_levels(&self) -> Vec<(Gfn, u8, bool)> {
        let frames = frame_count(&self.core);
        let mut kernel = Visited::new(frames);
        let mut out = Vec::new();
        let mut seen = FrameSet::new(frames);
        let _ = walk(
            &self.core,
            self.profile.layout.kernel_root,
            &mut kernel,
            &mut |e| {
                if let WalkEvent::Table(t) = e {
                    if !seen.contains(t.gfn) {
                        seen.insert(t.gfn);
                        out.push((t.gfn, t.level, true));
                    }
                }
            },
        );
        for r in self
            .profile
            .roots
            .iter()
            .map(|r| r.cr3)
            .chain(self.vcpu_cr3s.iter().copied())
        {
            let mut v = Visited::new(frames);
            let _ = walk(&self.core, r, &mut v, &mut |e| {
                if let WalkEvent::Table(t) = e {
                    if !seen.contains(t.gfn) {
                        seen.insert(t.gfn);
                        out.push((t.gfn, t.level, false));
                    }
                }
            });
        }
        out
    }

    /// Color the image.
    pub fn color(&self) -> Result<crate::ColorMap, crate::ColorError> {
        let opts = crate::ColorOptions {
            extra_roots: self.vcpu_cr3s.clone(),
            scan_zero: true,
        };
        crate::color(&self.core, &self.profile, &opts)
    }
}

/// Color raw guest-physical memory of a Linux guest (GPA 0 at offset 0, e.g. a kscope
/// snapshot's memory file) whose VMCOREINFO text comes separately (the guest's
/// `/sys/kernel/vmcoreinfo` note, or the note of an ELF dump of the same boot).
pub fn color_raw<M: PhysMem + ?Sized>(
    mem: &M,
    vmcoreinfo: &str,
) -> Result<(LinuxProfile, crate::ColorMap), LinuxError> {
    let v = Vmcoreinfo::parse(vmcoreinfo);
    if v.get("OSRELEASE").is_none() {
        return Err(VmcoreinfoError::Missing.into());
    }
    let profile = LinuxProfile::open(mem, &v, &[])?;
    let map = crate::color(mem, &profile, &crate::ColorOptions::default())?;
    Ok((profile, map))
}

impl GuestProfile for LinuxProfile {
    fn name(&self) -> &str {
        "linux"
    }

    fn kernel_roots(&self) -> Result<Vec<u64>, ProfileError> {
        Ok(vec![self.layout.kernel_root])
    }

    fn processes(&self) -> Result<Vec<ProcessRoot>, ProfileError> {
        Ok(self.roots.clone())
    }

    fn kernel_image(&self) -> Result<Vec<ImageRange>, ProfileError> {
        // Kernel text vs data comes from NX in the image mapping (the walk).
        Ok(Vec::new())
    }

    fn ignored_ranges(&self) -> Result<Vec<Range<u64>>, ProfileError> {
        let start = self.layout.direct_map;
        let len = self.layout.ram_end.div_ceil(1 << 30) << 30;
        let mut r = Vec::with_capacity(1 + self.stale_image.len());
        r.push(start..start.saturating_add(len));
        r.extend(self.stale_image.iter().cloned());
        Ok(r)
    }

    fn files(&self) -> Result<Vec<FileInfo>, ProfileError> {
        Ok(self.files.clone())
    }

    fn file_pages(&self, file: &FileInfo) -> Result<Vec<(u64, Gfn)>, ProfileError> {
        Ok(self
            .file_pages
            .get(&file.cache_root)
            .cloned()
            .unwrap_or_default())
    }

    fn frames_in_use(&self) -> Result<Option<FrameSet>, ProfileError> {
        Ok(Some(self.in_use.clone()))
    }

    fn frame_roles(&self) -> Result<Option<FrameRoles>, ProfileError> {
        Ok(Some(self.roles.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagewalk::{PageSize, PteFlags};

    #[test]
    fn kernel_versions_outside_the_read_range_are_refused() {
        for ok in [
            "4.18.0-553.el8",
            "5.15.0-91-generic",
            "6.1.0-48-cloud-amd64",
            "6.8.12",
        ] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "3.10.0-1160.el7",
            "4.14.1",
            "6.9.0",
            "6.12.48+deb13-cloud-amd64",
            "x",
        ] {
            let e = check_version(bad).unwrap_err().to_string();
            assert!(
                e.contains("unknown kernel version") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn freed_image_frames_become_ignored_ranges() {
        let leaf = Mapping {
            va: START_KERNEL_MAP + (2 << 20),
            pa: 0,
            size: PageSize::Size2M,
            flags: PteFlags::default(),
        };
        let reserved = PageFacts {
            flags: 1 << 12,
            ..PageFacts::default()
        };
        let mut facts = vec![Some(reserved); 512];
        for f in &mut facts[100..110] {
            *f = Some(PageFacts::default());
        }
        facts[300] = None;
        let r = stale_aliases(&[leaf], &facts, 12);
        let base = leaf.va;
        assert_eq!(
            r,
            vec![
                base + 100 * 4096..base + 110 * 4096,
                base + 300 * 4096..base + 301 * 4096
            ]
        );
    }
}
