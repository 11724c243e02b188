//! Ground truth of a Linux memory image, read inside the guest by `colorer/linux/ktruth.c`
//! (the format is described there), and the accuracy of a [`ColorMap`] against it.
//!
//! **Only the accuracy report reads this file**; the Linux profile never does.
//!
//! Each frame gets one truth row from the kernel's own accounting, first match wins:
//!
//! | row | from | expected color |
//! |---|---|---|
//! | `no_page` | `KPF_NOPAGE` | not compared |
//! | `page_table` | `KPF_PGTABLE` | `PageTable` |
//! | `free` | `KPF_BUDDY` first page, and the flag-less frames after it up to the largest power-of-two block the alignment allows (kpageflags marks only a block's first page; the total is checked against `nr_free_pages`) | `Free` |
//! | `kernel_text` | in `/proc/iomem` "Kernel code" and `KPF_RESERVED` (freed parts of the image, e.g. the text/rodata gap, are reused) | `KernelCode` |
//! | `kernel_image_data` | in "Kernel rodata", "Kernel data", "Kernel bss" and `KPF_RESERVED` | `KernelData` |
//! | `user_code` | mapped by a process in an executable VMA (`maps` + `pagemap`) | `UserCode` |
//! | `page_cache_exec` | resident page of a file with an execute bit (`mincore` + `pagemap`) | `PageCacheExec` |
//! | `page_cache_data` | resident page of another regular file | `PageCacheData` |
//! | `user_data` | `KPF_ANON` | `UserData` |
//! | `slab` | `KPF_SLAB` | `KernelData` |
//! | `page_cache_other` | `KPF_LRU`, `KPF_MMAP` or `KPF_UPTODATE`, not anonymous, not reserved (block-device metadata, files not reachable by path) | `PageCacheData` |
//! | `reserved` | `KPF_RESERVED` | `KernelData` |
//! | `kernel_other` | anything else (kernel allocations kpageflags has no flag for, per-CPU free lists) | `KernelData` |

use crate::accuracy::{AccuracyReport, ColorScore};
use crate::color::{Color, ColorMap};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Errors of ground-truth files.
#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    /// The file could not be read.
    #[error("cannot read the ground-truth file {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Error.
        source: std::io::Error,
    },
    /// Not a ground-truth file.
    #[error("not a kscope Linux ground-truth file (magic {0:?}): give the truth.bin that colorer/linux/make-image.sh wrote beside the image")]
    Magic(String),
    /// Another format version.
    #[error("ground-truth format version {0}, this build reads version 1: regenerate the image")]
    Version(u32),
    /// Cut or corrupt.
    #[error("ground-truth file is corrupt: {0}; regenerate the image")]
    Corrupt(String),
    /// Truth and map cover different memory.
    #[error("ground truth covers {truth} frames but the color map {colors}: color the image the truth was taken with")]
    SizeMismatch {
        /// Frames in the truth.
        truth: usize,
        /// Frames in the map.
        colors: usize,
    },
}

/// kpageflags bits used here (include/uapi/linux/kernel-page-flags.h).
mod kpf {
    pub const UPTODATE: u32 = 3;
    pub const LRU: u32 = 5;
    pub const SLAB: u32 = 7;
    pub const BUDDY: u32 = 10;
    pub const MMAP: u32 = 11;
    pub const ANON: u32 = 12;
    pub const NOPAGE: u32 = 20;
    pub const PGTABLE: u32 = 26;
    pub const RESERVED: u32 = 32;
}

/// A parsed ground-truth file.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    /// kpageflags per frame.
    pub flags: Vec<u64>,
    /// Kernel image ranges: (first byte, last byte, kind 1 code / 2 rodata / 3 data / 4 bss).
    pub iomem: Vec<(u64, u64, u32)>,
    /// User mappings: (frame, pid, flags 1 exec / 2 file / 4 write).
    pub user: Vec<(u64, u32, u32)>,
    /// Cached file pages: (frame, kind 1 exec / 2 data).
    pub cache: Vec<(u64, u32)>,
    /// `nr_free_pages` from /proc/vmstat.
    pub nr_free_pages: Option<u64>,
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (0xedb8_8320 & (0u32.wrapping_sub(c & 1)));
        }
    }
    !c
}

impl Truth {
    /// Read a ground-truth file.
    pub fn open(path: &Path) -> Result<Self, TruthError> {
        let b = std::fs::read(path).map_err(|source| TruthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&b)
    }

    /// Parse ground-truth bytes.
    pub fn parse(b: &[u8]) -> Result<Self, TruthError> {
        let corrupt = |s: &str| TruthError::Corrupt(s.to_string());
        if b.len() < 32 {
            return Err(corrupt("shorter than its header"));
        }
        if &b[..8] != b"KSCTRUTH" {
            return Err(TruthError::Magic(String::from_utf8_lossy(&b[..8]).into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version != 1 {
            return Err(TruthError::Version(version));
        }
        let crc = u32_at(12);
        let len = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(32))
            .filter(|&e| e <= b.len())
            .ok_or_else(|| corrupt("payload longer than the file"))?;
        let p = &b[32..end];
        if crc32(p) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let mut t = Truth::default();
        let mut at = 0usize;
        let rd = |at: usize, n: usize| p.get(at..at + n).ok_or_else(|| corrupt("section cut"));
        let r64 =
            |s: &[u8], o: usize| u64::from_le_bytes(s[o..o + 8].try_into().unwrap_or_default());
        let r32 =
            |s: &[u8], o: usize| u32::from_le_bytes(s[o..o + 4].try_into().unwrap_or_default());
        while at < p.len() {
            let h = rd(at, 16)?;
            let tag = r32(h, 0);
            let count = usize::try_from(r64(h, 8)).map_err(|_| corrupt("count"))?;
            at += 16;
            let rec = match tag {
                1 | 5 => 8,
                2 => 24,
                3 | 4 => 16,
                _ => return Err(corrupt("unknown section")),
            };
            let body = rd(at, count.checked_mul(rec).ok_or_else(|| corrupt("count"))?)?;
            for r in body.chunks_exact(rec) {
                match tag {
                    1 => t.flags.push(r64(r, 0)),
                    2 => t.iomem.push((r64(r, 0), r64(r, 8), r32(r, 16))),
                    3 => t.user.push((r64(r, 0), r32(r, 8), r32(r, 12))),
                    4 => t.cache.push((r64(r, 0), r32(r, 8))),
                    _ => t.nr_free_pages = Some(r64(r, 0)),
                }
            }
            at += body.len();
        }
        if t.flags.is_empty() {
            return Err(corrupt("no kpageflags section"));
        }
        Ok(t)
    }

    /// The truth row of every frame (see the module table).
    pub fn rows(&self) -> Vec<Row> {
        let n = self.flags.len();
        let bit = |f: u64, b: u32| f & (1u64 << b) != 0;
        let mut rows = vec![Row::KernelOther; n];
        let mut code = vec![false; n];
        let mut image = vec![false; n];
        for &(s, e, kind) in &self.iomem {
            for g in (s / 4096)..=(e / 4096) {
                if let Some(i) = usize::try_from(g).ok().filter(|&i| i < n) {
                    if kind == 1 {
                        code[i] = true;
                    } else {
                        image[i] = true;
                    }
                }
            }
        }
        let mut user_exec = vec![false; n];
        for &(g, _, f) in &self.user {
            if f & 1 != 0 && (g as usize) < n {
                user_exec[g as usize] = true;
            }
        }
        let mut cache: HashMap<u64, u32> = HashMap::new();
        for &(g, k) in &self.cache {
            cache.entry(g).or_insert(k);
        }
        let free = self.free_frames();
        for (g, row) in rows.iter_mut().enumerate() {
            let f = self.flags[g];
            *row = if bit(f, kpf::NOPAGE) {
                Row::NoPage
            } else if bit(f, kpf::PGTABLE) {
                Row::PageTable
            } else if free[g] {
                Row::Free
            } else if code[g] && bit(f, kpf::RESERVED) {
                Row::KernelText
            } else if image[g] && bit(f, kpf::RESERVED) {
                Row::KernelImageData
            } else if user_exec[g] {
                Row::UserCode
            } else if let Some(&k) = cache.get(&(g as u64)) {
                if k == 1 {
                    Row::PageCacheExec
                } else {
                    Row::PageCacheData
                }
            } else if bit(f, kpf::ANON) {
                Row::UserData
            } else if bit(f, kpf::SLAB) {
                Row::Slab
            } else if !bit(f, kpf::RESERVED)
                && (bit(f, kpf::LRU) || bit(f, kpf::MMAP) || bit(f, kpf::UPTODATE))
            {
                Row::PageCacheOther
            } else if bit(f, kpf::RESERVED) {
                Row::Reserved
            } else {
                Row::KernelOther
            };
        }
        rows
    }

    /// Frames in free buddy blocks: kpageflags marks a block's first page only; the block
    /// extends over the following flag-less frames, to the largest power of two that the
    /// first page's alignment (and order 10) allows.
    pub fn free_frames(&self) -> Vec<bool> {
        let n = self.flags.len();
        let mut free = vec![false; n];
        for g in 0..n {
            if self.flags[g] & (1 << kpf::BUDDY) == 0 {
                continue;
            }
            let max = 1usize << (g.trailing_zeros().min(10));
            let mut run = 1;
            while run < max && g + run < n && self.flags[g + run] == 0 {
                run += 1;
            }
            let size = 1usize << (usize::BITS - 1 - run.leading_zeros());
            for f in free.iter_mut().skip(g).take(size) {
                *f = true;
            }
        }
        free
    }
}

/// A truth row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[allow(missing_docs)]
pub enum Row {
    NoPage,
    PageTable,
    Free,
    KernelText,
    KernelImageData,
    UserCode,
    PageCacheExec,
    PageCacheData,
    UserData,
    Slab,
    PageCacheOther,
    Reserved,
    KernelOther,
}

impl Row {
    /// Every row.
    pub const ALL: [Row; 13] = [
        Row::NoPage,
        Row::PageTable,
        Row::Free,
        Row::KernelText,
        Row::KernelImageData,
        Row::UserCode,
        Row::PageCacheExec,
        Row::PageCacheData,
        Row::UserData,
        Row::Slab,
        Row::PageCacheOther,
        Row::Reserved,
        Row::KernelOther,
    ];

    /// Name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Row::NoPage => "no_page",
            Row::PageTable => "page_table",
            Row::Free => "free",
            Row::KernelText => "kernel_text",
            Row::KernelImageData => "kernel_image_data",
            Row::UserCode => "user_code",
            Row::PageCacheExec => "page_cache_exec",
            Row::PageCacheData => "page_cache_data",
            Row::UserData => "user_data",
            Row::Slab => "slab",
            Row::PageCacheOther => "page_cache_other",
            Row::Reserved => "reserved",
            Row::KernelOther => "kernel_other",
        }
    }

    /// The color a perfect colorer gives this row (`None`: not compared).
    pub const fn expected(self) -> Option<Color> {
        Some(match self {
            Row::NoPage => return None,
            Row::PageTable => Color::PageTable,
            Row::Free => Color::Free,
            Row::KernelText => Color::KernelCode,
            Row::UserCode => Color::UserCode,
            Row::PageCacheExec => Color::PageCacheExec,
            Row::PageCacheData | Row::PageCacheOther => Color::PageCacheData,
            Row::UserData => Color::UserData,
            Row::KernelImageData | Row::Slab | Row::Reserved | Row::KernelOther => {
                Color::KernelData
            }
        })
    }
}

/// Accuracy of a map against Linux ground truth.
#[derive(Clone, Debug, Serialize)]
pub struct LinuxAccuracy {
    /// The report (same shape as for kscope guests; matrix rows are truth rows).
    pub report: AccuracyReport,
    /// Frames the truth counts free (from kpageflags, see [`Truth::free_frames`]).
    pub truth_free_frames: u64,
    /// `nr_free_pages` the kernel counted at the same moment.
    pub nr_free_pages: Option<u64>,
}

/// Page-table frames found by walking, split by whether the kernel flags them
/// (`KPF_PGTABLE`): Linux 6.1 runs its page-table constructor only for PTE pages of processes
/// and for PMD pages; PGD/P4D/PUD pages, kernel PTE pages and boot-time tables carry no flag.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableBreakdown {
    /// "kernel L2 flagged" / "user L4 unflagged" ... -> frames.
    pub by_level: BTreeMap<String, u64>,
    /// Walked process PTE and PMD pages (the levels the kernel flags) that carry the flag,
    /// over all of them: how well walking matches the kernel's own marks where it makes them.
    pub flagged_levels_agreement: f64,
}

/// Split walked page tables (`tables`: frame, level, from the kernel root) by kernel flag.
pub fn table_breakdown(truth: &Truth, tables: &[(u64, u8, bool)]) -> TableBreakdown {
    let mut b = TableBreakdown::default();
    let (mut n, mut ok) = (0u64, 0u64);
    for &(g, level, kernel) in tables {
        let flagged = truth
            .flags
            .get(g as usize)
            .is_some_and(|f| f & (1 << kpf::PGTABLE) != 0);
        let key = format!(
            "{} L{level} {}",
            if kernel { "kernel" } else { "user" },
            if flagged { "flagged" } else { "unflagged" }
        );
        *b.by_level.entry(key).or_default() += 1;
        if !kernel && level <= 2 {
            n += 1;
            ok += u64::from(flagged);
        }
    }
    b.flagged_levels_agreement = if n == 0 { 1.0 } else { ok as f64 / n as f64 };
    b
}

/// Compare `map` with `truth`.
pub fn compare(truth: &Truth, map: &ColorMap) -> Result<LinuxAccuracy, TruthError> {
    // kpageflags may run past the last node's span (frames without a struct page): those
    // must all be `KPF_NOPAGE`; anything else means the map covers other memory.
    let extra_ok = truth.flags.len() >= map.colors.len()
        && truth.flags[map.colors.len()..]
            .iter()
            .all(|f| f & (1 << kpf::NOPAGE) != 0);
    if !extra_ok {
        return Err(TruthError::SizeMismatch {
            truth: truth.flags.len(),
            colors: map.colors.len(),
        });
    }
    let mut rows = truth.rows();
    rows.truncate(map.colors.len());
    let mut m: BTreeMap<Row, [u64; Color::COUNT]> = BTreeMap::new();
    let (mut n, mut ok, mut ok_zero) = (0u64, 0u64, 0u64);
    for (g, (&r, &c)) in rows.iter().zip(&map.colors).enumerate() {
        m.entry(r).or_insert([0; Color::COUNT])[c.index()] += 1;
        let Some(exp) = r.expected() else { continue };
        n += 1;
        let hit = exp == c;
        ok += u64::from(hit);
        ok_zero += u64::from(hit || c == Color::Zero || map.zero.contains(g as u64));
    }
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    let mut scores = Vec::new();
    for c in Color::ALL {
        let predicted: u64 = m
            .iter()
            .filter(|(r, _)| r.expected().is_some())
            .map(|(_, v)| v[c.index()])
            .sum();
        let actual: u64 = m
            .iter()
            .filter(|(r, _)| r.expected() == Some(c))
            .map(|(_, v)| v.iter().sum::<u64>())
            .sum();
        let correct: u64 = m
            .iter()
            .filter(|(r, _)| r.expected() == Some(c))
            .map(|(_, v)| v[c.index()])
            .sum();
        if predicted == 0 && actual == 0 {
            continue;
        }
        scores.push(ColorScore {
            color: c,
            predicted,
            actual,
            correct,
            precision: ratio(correct, predicted),
            recall: ratio(correct, actual),
        });
    }
    let matrix = m
        .iter()
        .map(|(r, v)| {
            let cols = Color::ALL
                .into_iter()
                .filter(|c| v[c.index()] > 0)
                .map(|c| (c, v[c.index()]))
                .collect();
            (r.name(), cols)
        })
        .collect();
    Ok(LinuxAccuracy {
        report: AccuracyReport {
            frames: n,
            matrix,
            scores,
            accuracy: ratio(ok, n),
            accuracy_zero_ok: ratio(ok_zero, n),
        },
        truth_free_frames: truth.free_frames().iter().filter(|&&f| f).count() as u64,
        nr_free_pages: truth.nr_free_pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::FrameSet;

    fn file(sections: &[(u32, Vec<u8>, u64)]) -> Vec<u8> {
        let mut p = Vec::new();
        for (tag, body, count) in sections {
            p.extend_from_slice(&tag.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            p.extend_from_slice(&count.to_le_bytes());
            p.extend_from_slice(body);
        }
        let mut b = b"KSCTRUTH".to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&crc32(&p).to_le_bytes());
        b.extend_from_slice(&(p.len() as u64).to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&p);
        b
    }

    #[test]
    fn rows_free_blocks_and_scores() {
        // Frames: 0 buddy head (order 2: 1..3 flag-less), 4 slab, 5 anon, 6 page table,
        // 7 kernel code, 8 flag-less kernel page, 9 user-mapped exec, 10 exec cache, 11 lru.
        let mut flags = [0u64; 12];
        flags[0] = 1 << kpf::BUDDY;
        flags[4] = 1 << kpf::SLAB;
        flags[5] = 1 << kpf::ANON;
        flags[6] = 1 << kpf::PGTABLE;
        flags[7] = 1 << kpf::RESERVED;
        flags[3] = 0;
        flags[8] = 0;
        flags[9] = 1 << kpf::LRU;
        flags[10] = 1 << kpf::LRU;
        flags[11] = 1 << kpf::LRU;
        let kp: Vec<u8> = flags.iter().flat_map(|f| f.to_le_bytes()).collect();
        let mut io = Vec::new();
        io.extend_from_slice(&(7u64 * 4096).to_le_bytes());
        io.extend_from_slice(&(7u64 * 4096 + 4095).to_le_bytes());
        io.extend_from_slice(&1u32.to_le_bytes());
        io.extend_from_slice(&0u32.to_le_bytes());
        let mut user = Vec::new();
        user.extend_from_slice(&9u64.to_le_bytes());
        user.extend_from_slice(&1u32.to_le_bytes());
        user.extend_from_slice(&3u32.to_le_bytes());
        let mut cache = Vec::new();
        cache.extend_from_slice(&10u64.to_le_bytes());
        cache.extend_from_slice(&1u32.to_le_bytes());
        cache.extend_from_slice(&0u32.to_le_bytes());
        let b = file(&[
            (4, cache, 1),
            (3, user, 1),
            (2, io, 1),
            (5, 4u64.to_le_bytes().to_vec(), 1),
            (1, kp, 12),
        ]);
        let t = Truth::parse(&b).unwrap();
        let rows = t.rows();
        use Row::*;
        assert_eq!(
            rows,
            vec![
                Free,
                Free,
                Free,
                Free,
                Slab,
                UserData,
                PageTable,
                KernelText,
                KernelOther,
                UserCode,
                PageCacheExec,
                PageCacheOther
            ]
        );
        let colors: Vec<Color> = rows.iter().map(|r| r.expected().unwrap()).collect();
        let mut colors2 = colors.clone();
        colors2[8] = Color::Zero;
        let mut zero = FrameSet::new(12);
        zero.insert(8);
        let a = compare(&t, &ColorMap::from_colors(colors2, zero, vec![])).unwrap();
        assert_eq!(a.truth_free_frames, 4);
        assert_eq!(a.nr_free_pages, Some(4));
        assert!((a.report.accuracy - 11.0 / 12.0).abs() < 1e-9);
        assert!((a.report.accuracy_zero_ok - 1.0).abs() < 1e-9);
        assert_eq!(a.report.matrix["kernel_other"][&Color::Zero], 1);
        assert!(compare(
            &t,
            &ColorMap::from_colors(colors[..5].to_vec(), FrameSet::new(5), vec![])
        )
        .is_err());
        // Corruption is caught by the checksum; other files by the magic.
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(Truth::parse(&bad), Err(TruthError::Corrupt(_))));
        assert!(matches!(
            Truth::parse(&[0u8; 40]),
            Err(TruthError::Magic(_))
        ));
        assert!(Truth::parse(&b[..b.len() - 8]).is_err());
    }
}
