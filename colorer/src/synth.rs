//! Synthetic kscope guest memory images with known answers, for tests and cost measurement.
//!
//! [`ImageBuilder`] writes x86-64 page tables and frames into a memory image; [`build`] lays
//! out a whole kscope-like guest from a [`SynthSpec`] the way the kernel's ABI describes it
//! (KInfo, kernel page tables with a direct map, process and file tables, radix trees, frame
//! bitmap, ground-truth table), with physically interwoven allocations, and returns the color
//! each frame must get.

use crate::color::Color;
use crate::mem::{is_zero, FrameSet, Gfn};
use crate::pagewalk::{PageSize, KERNEL_HALF};
use crate::profile::FileKind;
use kscope_guest::abi::as_bytes;
use kscope_guest::abi::kinfo::{
    file_kind, frame_use, ground_truth, proc_state, FileAbi, KInfo, ProcAbi, RadixNode,
    KINFO_MAGIC, KINFO_VERSION, RADIX_FANOUT, RADIX_NODE_SIZE, RADIX_SHIFT,
};
use kscope_guest::abi::layout::{
    DIRECT_MAP_BASE, KERNEL_PHYS_BASE, KERNEL_VIRT_BASE, KINFO_GPA, LARGE_PAGE_SIZE, MMIO_BASE,
    MMIO_VIRT_BASE, PAGE_SIZE, USER_IMAGE_BASE, USER_MMAP_BASE, USER_STACK_TOP,
};

/// Raw page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// User.
    pub const US: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty.
    pub const D: u64 = 1 << 6;
    /// Large page.
    pub const PS: u64 = 1 << 7;
    /// Global.
    pub const G: u64 = 1 << 8;
    /// Execute disable.
    pub const NX: u64 = 1 << 63;
}

/// Errors of the synthetic builder.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The spec needs more frames than the memory has.
    #[error("synthetic guest needs more than {0} frames: give more memory or ask for fewer pages")]
    OutOfFrames(u64),
    /// The spec is not buildable.
    #[error("invalid synthetic spec: {0}")]
    Spec(&'static str),
}

/// A memory image with a frame pool and a page-table writer.
pub struct ImageBuilder {
    /// The image.
    pub mem: Vec<u8>,
    /// Page-table frames created by [`ImageBuilder::map`] and [`ImageBuilder::new_table`].
    pub tables: Vec<Gfn>,
    pool: Vec<Gfn>,
    cursor: usize,
}

impl ImageBuilder {
    /// An all-zero image of `mem_bytes` whose pool hands out frames `first_free..`.
    pub fn new(mem_bytes: u64, first_free: Gfn) -> Self {
        let frames = mem_bytes / PAGE_SIZE;
        ImageBuilder {
            mem: vec![0; mem_bytes as usize],
            tables: Vec::new(),
            pool: (first_free..frames).collect(),
            cursor: 0,
        }
    }

    /// Shuffle the frames not yet handed out (deterministic in `seed`), so that allocations
    /// interleave physically as in a long-running guest.
    pub fn shuffle(&mut self, seed: u64) {
        let mut x = seed | 1;
        let rest = &mut self.pool[self.cursor..];
        for i in (1..rest.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            rest.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }

    /// Hand out a frame (all zero).
    pub fn alloc(&mut self) -> Result<Gfn, SynthError> {
        let g = *self
            .pool
            .get(self.cursor)
            .ok_or(SynthError::OutOfFrames(self.pool.len() as u64))?;
        self.cursor += 1;
        Ok(g)
    }

    /// Hand out `n` physically contiguous frames from the front of an unshuffled pool.
    pub fn alloc_contig(&mut self, n: u64) -> Result<Gfn, SynthError> {
        let first = self.alloc()?;
        for i in 1..n {
            if self.alloc()? != first + i {
                return Err(SynthError::Spec("contiguous allocation after shuffle"));
            }
        }
        Ok(first)
    }

    /// The frames not handed out yet.
    pub fn remaining(&self) -> &[Gfn] {
        &self.pool[self.cursor..]
    }

    /// A new zeroed page-table frame.
    pub fn new_table(&mut self) -> Result<Gfn, SynthError> {
        let g = self.alloc()?;
        self.tables.push(g);
        Ok(g)
    }

    /// Write bytes at `gpa` (panics outside the image: builder misuse).
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
    }

    /// Write a little-endian u64.
    pub fn write_u64(&mut self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    /// Read a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let b: [u8; 8] = self.mem[gpa as usize..gpa as usize + 8]
            .try_into()
            .unwrap_or_default();
        u64::from_le_bytes(b)
    }

    /// Fill frame `gfn` with a non-zero pattern.
    pub fn fill(&mut self, gfn: Gfn) {
        let b = (gfn % 251) as u8 + 1;
        let s = (gfn * PAGE_SIZE) as usize;
        self.mem[s..s + PAGE_SIZE as usize].fill(b);
    }

    /// Map `va -> pa` with a leaf of `size` and `flags` (P and PS added) under the PML4
    /// `root`, creating intermediate tables (P|RW, plus US in the lower half) as needed.
    /// Panics if a large leaf is in the way (builder misuse).
    pub fn map(
        &mut self,
        root: Gfn,
        va: u64,
        pa: u64,
        size: PageSize,
        flags: u64,
    ) -> Result<(), SynthError> {
        let leaf_level = match size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        };
        let inter = pte::P | pte::RW | if va < KERNEL_HALF { pte::US } else { 0 };
        let mut table = root;
        for level in (leaf_level..=4u32).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 511;
            let at = table * PAGE_SIZE + idx * 8;
            if level == leaf_level {
                let ps = if leaf_level > 1 { pte::PS } else { 0 };
                self.write_u64(at, pa | flags | pte::P | ps);
                return Ok(());
            }
            let e = self.read_u64(at);
            if e & pte::P == 0 {
                let t = self.new_table()?;
                self.write_u64(at, (t * PAGE_SIZE) | inter);
                table = t;
            } else {
                assert!(
                    e & pte::PS == 0,
                    "synthetic map over a large page at {va:#x}"
                );
                table = (e & 0x000f_ffff_ffff_f000) / PAGE_SIZE;
            }
        }
        Ok(())
    }
}

/// A synthetic process.
#[derive(Clone, Debug, Default)]
pub struct ProcSpec {
    /// Program name.
    pub name: String,
    /// Private (anonymous) executable pages.
    pub code_pages: u64,
    /// Anonymous data pages with content.
    pub data_pages: u64,
    /// Anonymous data pages left zero.
    pub zero_data_pages: u64,
    /// An executable file (index in [`SynthSpec::files`]) whose cached pages are mapped: the
    /// first `exec_mapped` executable, the rest read-only non-executable.
    pub exec_file: Option<usize>,
    /// See `exec_file`.
    pub exec_mapped: u64,
    /// A data file mapped read-only (shared page cache).
    pub mmap_file: Option<usize>,
}

/// A synthetic cached file.
#[derive(Clone, Debug)]
pub struct FileSpec {
    /// Path.
    pub name: String,
    /// Executable or data.
    pub kind: FileKind,
    /// Cached page indices (any order, no duplicates).
    pub indices: Vec<u64>,
}

/// What to put in a synthetic guest.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    /// Guest RAM (a multiple of 2 MiB, at least 8 MiB).
    pub mem_bytes: u64,
    /// Shuffle seed (0 = allocate in address order).
    pub seed: u64,
    /// Kernel text pages.
    pub text_pages: u64,
    /// Kernel rodata pages.
    pub rodata_pages: u64,
    /// Kernel data pages (the first holds the process table).
    pub data_pages: u64,
    /// Zero bss pages after data.
    pub bss_pages: u64,
    /// Processes (at most 32).
    pub procs: Vec<ProcSpec>,
    /// Cached files.
    pub files: Vec<FileSpec>,
    /// Kernel heap pages with content, referenced by nothing the colorer reads.
    pub heap_pages: u64,
    /// Kernel heap pages left zero.
    pub heap_zero_pages: u64,
    /// Free pages with stale content (the other free pages are zero).
    pub free_garbage_pages: u64,
}

impl SynthSpec {
    /// A small guest (16 MiB) exercising every color and precedence rule.
    pub fn small() -> Self {
        let files = vec![
            FileSpec {
                name: "/bin/web".into(),
                kind: FileKind::Exec,
                indices: (0..24).collect(),
            },
            FileSpec {
                name: "/data/a.tbl".into(),
                kind: FileKind::Data,
                indices: vec![0, 1, 2, 5, 64, 65, 4097],
            },
            FileSpec {
                name: "/data/b.tbl".into(),
                kind: FileKind::Data,
                indices: (0..40).rev().collect(),
            },
            FileSpec {
                name: "/bin/tool".into(),
                kind: FileKind::Exec,
                indices: vec![3, 4],
            },
        ];
        let procs = vec![
            ProcSpec {
                name: "/bin/web".into(),
                code_pages: 3,
                data_pages: 20,
                zero_data_pages: 5,
                exec_file: Some(0),
                exec_mapped: 16,
                mmap_file: Some(1),
            },
            ProcSpec {
                name: "/bin/agent".into(),
                code_pages: 8,
                data_pages: 6,
                zero_data_pages: 2,
                ..Default::default()
            },
        ];
        SynthSpec {
            mem_bytes: 16 << 20,
            seed: 42,
            text_pages: 16,
            rodata_pages: 4,
            data_pages: 4,
            bss_pages: 2,
            procs,
            files,
            heap_pages: 30,
            heap_zero_pages: 10,
            free_garbage_pages: 100,
        }
    }

    /// A guest of `mem_bytes` with realistic proportions (for cost measurement): about 8%
    /// user data, 30% page cache, 7% heap, 10% stale free pages, the rest free and zero.
    pub fn scaled(mem_bytes: u64) -> Self {
        let frames = mem_bytes / PAGE_SIZE;
        let mut files: Vec<FileSpec> = (0..4)
            .map(|i| FileSpec {
                name: format!("/bin/p{i}"),
                kind: FileKind::Exec,
                indices: (0..128).collect(),
            })
            .collect();
        let per_data_file = frames * 30 / 100 / 8;
        for i in 0..8 {
            let indices = (0..per_data_file * 7 / 6)
                .filter(|x| x % 7 != 3)
                .take(per_data_file as usize)
                .collect();
            files.push(FileSpec {
                name: format!("/data/f{i}.tbl"),
                kind: FileKind::Data,
                indices,
            });
        }
        let procs = (0..4)
            .map(|i| ProcSpec {
                name: format!("/bin/p{i}"),
                code_pages: 64,
                data_pages: frames * 8 / 100 / 4,
                zero_data_pages: frames * 2 / 100 / 4,
                exec_file: Some(i),
                exec_mapped: 96,
                mmap_file: Some(4 + i),
            })
            .collect();
        SynthSpec {
            mem_bytes,
            seed: 7,
            text_pages: 256,
            rodata_pages: 64,
            data_pages: 64,
            bss_pages: 32,
            procs,
            files,
            heap_pages: frames * 5 / 100,
            heap_zero_pages: frames * 2 / 100,
            free_garbage_pages: frames / 10,
        }
    }
}

/// The cached pages of a synthetic file: (ino, kind, (index, frame) in file order).
pub type SynthFile = (u32, FileKind, Vec<(u64, Gfn)>);

/// A built synthetic guest.
pub struct SynthGuest {
    /// Guest RAM.
    pub mem: Vec<u8>,
    /// The color every frame must get.
    pub expected: Vec<Color>,
    /// Guest-physical address of the kernel PML4.
    pub kernel_pml4: u64,
    /// (pid, CR3) of each process.
    pub procs: Vec<(u32, u64)>,
    /// Per file (ino, kind), its cached (index, frame) pairs in file order.
    pub files: Vec<SynthFile>,
}

/// Ground truth plus expected color, per frame, while building.
struct Book {
    truth: Vec<u32>,
    expected: Vec<Color>,
    /// In use but unreferenced: the expected color depends on content (Zero or KernelData).
    unref: FrameSet,
    free: FrameSet,
}

impl Book {
    fn set(&mut self, g: Gfn, use_: u8, owner: u32, c: Color) {
        self.truth[g as usize] = ground_truth(use_, owner);
        self.expected[g as usize] = c;
    }
}

fn dm(gfn: Gfn) -> u64 {
    DIRECT_MAP_BASE + gfn * PAGE_SIZE
}

/// Build the radix tree of `pages` (index -> frame), packing nodes into frames from `b`;
/// returns the root's virtual address.
fn build_radix(
    b: &mut ImageBuilder,
    book: &mut Book,
    pages: &[(u64, Gfn)],
) -> Result<u64, SynthError> {
    if pages.is_empty() {
        return Ok(0);
    }
    let max = pages.iter().map(|p| p.0).max().unwrap_or(0);
    let mut shift = 0u32;
    while shift < 60 && (max >> shift) >= RADIX_FANOUT as u64 {
        shift += RADIX_SHIFT;
    }
    let mut slab: Option<(Gfn, usize)> = None;
    let mut alloc_node = |b: &mut ImageBuilder, book: &mut Book| -> Result<u64, SynthError> {
        let per = PAGE_SIZE as usize / RADIX_NODE_SIZE;
        let (g, used) = match slab {
            Some((g, u)) if u < per => (g, u),
            _ => {
                let g = b.alloc()?;
                book.set(g, frame_use::KERNEL_DATA, 0, Color::KernelData);
                (g, 0)
            }
        };
        slab = Some((g, used + 1));
        Ok(g * PAGE_SIZE + (used * RADIX_NODE_SIZE) as u64)
    };
    // Recursive construction over sorted pages.
    fn node(
        b: &mut ImageBuilder,
        book: &mut Book,
        alloc: &mut dyn FnMut(&mut ImageBuilder, &mut Book) -> Result<u64, SynthError>,
        pages: &[(u64, Gfn)],
        shift: u32,
        parent: u64,
    ) -> Result<u64, SynthError> {
        let pa = alloc(b, book)?;
        let va = DIRECT_MAP_BASE + pa;
        let mut n = RadixNode {
            shift,
            count: 0,
            parent,
            slots: [0; RADIX_FANOUT],
        };
        let mut i = 0;
        while i < pages.len() {
            let slot = ((pages[i].0 >> shift) & 63) as usize;
            let mut j = i;
            while j < pages.len() && ((pages[j].0 >> shift) & 63) as usize == slot {
                j += 1;
            }
            n.slots[slot] = if shift == 0 {
                dm(pages[i].1)
            } else {
                node(b, book, alloc, &pages[i..j], shift - RADIX_SHIFT, va)?
            };
            n.count += 1;
            i = j;
        }
        b.write(pa, as_bytes(&n));
        Ok(va)
    }
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    node(b, book, &mut alloc_node, &sorted, shift, 0)
}

/// Build the guest described by `spec`.
pub fn build(spec: &SynthSpec) -> Result<SynthGuest, SynthError> {
    if !spec.mem_bytes.is_multiple_of(LARGE_PAGE_SIZE)
        || spec.mem_bytes < (8 << 20)
        || spec.mem_bytes > MMIO_BASE
    {
        return Err(SynthError::Spec(
            "mem_bytes must be a multiple of 2 MiB in [8 MiB, 8 GiB]",
        ));
    }
    if spec.procs.len() > 32 || spec.data_pages == 0 || spec.text_pages == 0 {
        return Err(SynthError::Spec(
            "at most 32 processes, and at least one text and one data page",
        ));
    }
    let frames = spec.mem_bytes / PAGE_SIZE;
    let img = KERNEL_PHYS_BASE / PAGE_SIZE;
    let img_pages = spec.text_pages + spec.rodata_pages + spec.data_pages + spec.bss_pages;
    let mut b = ImageBuilder::new(spec.mem_bytes, img + img_pages);
    let mut book = Book {
        truth: vec![0; frames as usize],
        expected: vec![Color::Free; frames as usize],
        unref: FrameSet::new(frames),
        free: FrameSet::new(frames),
    };
    // Boot area: reserved, mostly zero, a few structures with content; mapped as kernel data
    // through the image window (below), so KernelData even when zero.
    for g in 0..img {
        book.set(g, frame_use::BOOT, 0, Color::KernelData);
    }
    for g in [1, 2, 3] {
        b.fill(g);
    }
    // Kernel image.
    let text = img..img + spec.text_pages;
    let rodata = text.end..text.end + spec.rodata_pages;
    let data = rodata.end..rodata.end + spec.data_pages + spec.bss_pages;
    for g in text.clone() {
        b.fill(g);
        book.set(g, frame_use::KERNEL_TEXT, 0, Color::KernelCode);
    }
    for g in rodata.start..data.start + spec.data_pages {
        b.fill(g);
        book.set(g, frame_use::KERNEL_DATA, 0, Color::KernelData);
    }
    for g in data.start + spec.data_pages..data.end {
        book.set(g, frame_use::KERNEL_DATA, 0, Color::KernelData);
    }
    // Early contiguous allocations: frame bitmap, ground truth, file table.
    let bitmap_pages = frames.div_ceil(8).div_ceil(PAGE_SIZE);
    let truth_pages = (frames * 4).div_ceil(PAGE_SIZE);
    let file_max = spec.files.len() as u64 + 4;
    let file_stride = 256u64;
    let file_pages = (file_max * file_stride).div_ceil(PAGE_SIZE);
    let bitmap = b.alloc_contig(bitmap_pages)?;
    let truth_tab = b.alloc_contig(truth_pages)?;
    let file_tab = b.alloc_contig(file_pages)?;
    for g in bitmap..bitmap + bitmap_pages {
        book.set(g, frame_use::KERNEL_DATA, 0, Color::KernelData);
        book.unref.insert(g);
    }
    for g in (truth_tab..truth_tab + truth_pages).chain(file_tab..file_tab + file_pages) {
        book.set(g, frame_use::KERNEL_DATA, 0, Color::KernelData);
        book.unref.insert(g);
    }
    if spec.seed != 0 {
        b.shuffle(spec.seed);
    }

    // Kernel address space: direct map (2 MiB, NX), image (4 KiB by section), MMIO.
    let kpml4 = b.new_table()?;
    for off in (0..spec.mem_bytes).step_by(LARGE_PAGE_SIZE as usize) {
        b.map(
            kpml4,
            DIRECT_MAP_BASE + off,
            off,
            PageSize::Size2M,
            pte::RW | pte::NX | pte::G,
        )?;
    }
    for g in text.clone() {
        b.map(
            kpml4,
            KERNEL_VIRT_BASE + g * PAGE_SIZE,
            g * PAGE_SIZE,
            PageSize::Size4K,
            pte::G | pte::A,
        )?;
    }
    for g in rodata.clone() {
        b.map(
            kpml4,
            KERNEL_VIRT_BASE + g * PAGE_SIZE,
            g * PAGE_SIZE,
            PageSize::Size4K,
            pte::G | pte::NX,
        )?;
    }
    for g in data.clone() {
        b.map(
            kpml4,
            KERNEL_VIRT_BASE + g * PAGE_SIZE,
            g * PAGE_SIZE,
            PageSize::Size4K,
            pte::G | pte::NX | pte::RW,
        )?;
    }
    b.map(
        kpml4,
        MMIO_VIRT_BASE,
        MMIO_BASE,
        PageSize::Size4K,
        pte::RW | pte::NX,
    )?;
    // Like the kernel: the reserved boot area also through the image window, data only.
    for g in 0..img {
        let (va, pa) = (KERNEL_VIRT_BASE + g * PAGE_SIZE, g * PAGE_SIZE);
        b.map(kpml4, va, pa, PageSize::Size4K, pte::RW | pte::NX)?;
    }

    // Files and their page caches.
    let mut files = Vec::new();
    for (i, f) in spec.files.iter().enumerate() {
        let ino = i as u32 + 1;
        let (use_, color, kind) = match f.kind {
            FileKind::Exec => (
                frame_use::PAGE_CACHE_EXEC,
                Color::PageCacheExec,
                file_kind::EXEC,
            ),
            FileKind::Data => (
                frame_use::PAGE_CACHE_DATA,
                Color::PageCacheData,
                file_kind::DATA,
            ),
        };
        let mut pages = Vec::new();
        for &idx in &f.indices {
            let g = b.alloc()?;
            b.fill(g);
            book.set(g, use_, ino, color);
            pages.push((idx, g));
        }
        pages.sort_unstable();
        let root = build_radix(&mut b, &mut book, &pages)?;
        let mut fa = FileAbi {
            kind,
            ino,
            size: (pages.last().map_or(0, |p| p.0) + 1) * PAGE_SIZE,
            radix_root: root,
            nr_cached: pages.len() as u64,
            name: [0; 64],
        };
        let n = f.name.len().min(63);
        fa.name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
        b.write(file_tab * PAGE_SIZE + i as u64 * file_stride, as_bytes(&fa));
        files.push((ino, f.kind, pages));
    }

    // Processes.
    let mut procs = Vec::new();
    let proc_table_pa = data.start * PAGE_SIZE;
    let user = pte::US | pte::A;
    b.write(proc_table_pa, &[0u8; PAGE_SIZE as usize]);
    for (i, p) in spec.procs.iter().enumerate() {
        let pid = i as u32 + 1;
        let root = b.new_table()?;
        for e in 256..512 {
            let v = b.read_u64(kpml4 * PAGE_SIZE + e * 8);
            b.write_u64(root * PAGE_SIZE + e * 8, v);
        }
        let mut va = USER_IMAGE_BASE + 0x1000_0000;
        for _ in 0..p.code_pages {
            let g = b.alloc()?;
            b.fill(g);
            book.set(g, frame_use::USER_CODE, pid, Color::UserCode);
            b.map(root, va, g * PAGE_SIZE, PageSize::Size4K, user)?;
            va += PAGE_SIZE;
        }
        if let Some(fi) = p.exec_file {
            let (_, _, pages) = files
                .get(fi)
                .ok_or(SynthError::Spec("exec_file out of range"))?
                .clone();
            for (k, &(idx, g)) in pages.iter().enumerate() {
                let exec = (k as u64) < p.exec_mapped;
                let flags = if exec { user } else { user | pte::NX };
                b.map(
                    root,
                    USER_IMAGE_BASE + idx * PAGE_SIZE,
                    g * PAGE_SIZE,
                    PageSize::Size4K,
                    flags,
                )?;
                if exec && book.truth[g as usize] & 0xff != u32::from(frame_use::USER_CODE) {
                    book.set(g, frame_use::USER_CODE, pid, Color::UserCode);
                }
            }
        }
        if let Some(fi) = p.mmap_file {
            let (_, _, pages) = files
                .get(fi)
                .ok_or(SynthError::Spec("mmap_file out of range"))?
                .clone();
            for &(idx, g) in &pages {
                b.map(
                    root,
                    USER_MMAP_BASE + (1 << 30) + idx * PAGE_SIZE,
                    g * PAGE_SIZE,
                    PageSize::Size4K,
                    user | pte::NX,
                )?;
            }
        }
        let mut va = USER_MMAP_BASE;
        for k in 0..p.data_pages + p.zero_data_pages {
            let g = b.alloc()?;
            if k < p.data_pages {
                b.fill(g);
            }
            book.set(g, frame_use::USER_DATA, pid, Color::UserData);
            // The last two data pages are the stack.
            let at = if k + 2 >= p.data_pages + p.zero_data_pages {
                USER_STACK_TOP - (p.data_pages + p.zero_data_pages - k) * PAGE_SIZE
            } else {
                va
            };
            b.map(
                root,
                at,
                g * PAGE_SIZE,
                PageSize::Size4K,
                user | pte::RW | pte::NX | pte::D,
            )?;
            va += PAGE_SIZE;
        }
        let mut pa = ProcAbi {
            state: if i % 2 == 0 {
                proc_state::RUNNABLE
            } else {
                proc_state::BLOCKED
            },
            pid,
            cr3: root * PAGE_SIZE,
            name: [0; 32],
        };
        let n = p.name.len().min(31);
        pa.name[..n].copy_from_slice(&p.name.as_bytes()[..n]);
        b.write(proc_table_pa + i as u64 * 128, as_bytes(&pa));
        procs.push((pid, root * PAGE_SIZE));
    }
    // A zombie whose root points at garbage: must be ignored.
    let zombie = ProcAbi {
        state: proc_state::ZOMBIE,
        pid: 99,
        cr3: 0x5000,
        name: [0; 32],
    };
    b.write(
        proc_table_pa + spec.procs.len() as u64 * 128,
        as_bytes(&zombie),
    );

    // Kernel heap.
    for k in 0..spec.heap_pages + spec.heap_zero_pages {
        let g = b.alloc()?;
        if k < spec.heap_pages {
            b.fill(g);
        }
        book.set(g, frame_use::KERNEL_DATA, 0, Color::KernelData);
        book.unref.insert(g);
    }
    for g in b.tables.clone() {
        book.set(g, frame_use::PAGE_TABLE, 0, Color::PageTable);
    }
    // The rest is free.
    let rest = b.remaining().to_vec();
    for (k, &g) in rest.iter().enumerate() {
        if (k as u64) < spec.free_garbage_pages {
            b.fill(g);
        }
        book.set(g, frame_use::FREE, 0, Color::Free);
        book.free.insert(g);
    }

    // Descriptor, bitmap, ground truth.
    let kinfo = KInfo {
        magic: KINFO_MAGIC,
        version: KINFO_VERSION,
        size: core::mem::size_of::<KInfo>() as u32,
        direct_map_base: DIRECT_MAP_BASE,
        kernel_virt_base: KERNEL_VIRT_BASE,
        kernel_pml4: kpml4 * PAGE_SIZE,
        mem_bytes: spec.mem_bytes,
        text_start: KERNEL_VIRT_BASE + text.start * PAGE_SIZE,
        text_end: KERNEL_VIRT_BASE + text.end * PAGE_SIZE,
        rodata_start: KERNEL_VIRT_BASE + rodata.start * PAGE_SIZE,
        rodata_end: KERNEL_VIRT_BASE + rodata.end * PAGE_SIZE,
        data_start: KERNEL_VIRT_BASE + data.start * PAGE_SIZE,
        data_end: KERNEL_VIRT_BASE + data.end * PAGE_SIZE,
        frame_bitmap: dm(bitmap),
        frame_count: frames,
        free_frames: book.free.len(),
        proc_table: KERNEL_VIRT_BASE + proc_table_pa,
        proc_max: 32,
        proc_stride: 128,
        file_table: dm(file_tab),
        file_max: file_max as u32,
        file_stride: file_stride as u32,
        ground_truth: dm(truth_tab),
        sigclone_count: 0,
        seen_generation: 0,
        user_pml4_template: 0,
    };
    b.write(KINFO_GPA, as_bytes(&kinfo));
    let mut bits = vec![0u8; frames.div_ceil(8) as usize];
    for g in 0..frames {
        if !book.free.contains(g) {
            bits[(g / 8) as usize] |= 1 << (g % 8);
        }
    }
    b.write(bitmap * PAGE_SIZE, &bits);
    let truth_bytes: Vec<u8> = book.truth.iter().flat_map(|t| t.to_le_bytes()).collect();
    b.write(truth_tab * PAGE_SIZE, &truth_bytes);
    // Unreferenced in-use frames are Zero when their content is.
    for g in book.unref.iter() {
        let s = (g * PAGE_SIZE) as usize;
        if is_zero(&b.mem[s..s + PAGE_SIZE as usize]) {
            book.expected[g as usize] = Color::Zero;
        }
    }
    Ok(SynthGuest {
        mem: b.mem,
        expected: book.expected,
        kernel_pml4: kpml4 * PAGE_SIZE,
        procs,
        files,
    })
}
