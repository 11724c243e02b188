//! Colors, the color map and the coloring pass (precedence in the crate docs).

use crate::mem::{frame_count, page_is_zero, FrameSet, Gfn, PhysMem};
use crate::pagewalk::{walk, Mapping, Visited, WalkEvent, WalkStats, KERNEL_HALF};
use crate::profile::{FileKind, GuestProfile, ProfileAnomalies, ProfileError, Section};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::Instant;

/// The role of a guest frame, as guessed from the outside.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    /// Nothing is known (no reference, no allocator information, non-zero content).
    Unknown = 0,
    /// Free in the guest's allocator.
    Free,
    /// Unreferenced and all-zero.
    Zero,
    /// Kernel code.
    KernelCode,
    /// Kernel data (image data, kernel mappings, allocated but unreferenced frames).
    KernelData,
    /// Mapped executable into a user process.
    UserCode,
    /// Mapped non-executable into a user process (anonymous memory).
    UserData,
    /// A page-table page of any level.
    PageTable,
    /// Page cache of a data file.
    PageCacheData,
    /// Page cache of an executable.
    PageCacheExec,
}

impl Color {
    /// Number of colors.
    pub const COUNT: usize = 10;
    /// Every color, in discriminant order.
    pub const ALL: [Color; Color::COUNT] = [
        Color::Unknown,
        Color::Free,
        Color::Zero,
        Color::KernelCode,
        Color::KernelData,
        Color::UserCode,
        Color::UserData,
        Color::PageTable,
        Color::PageCacheData,
        Color::PageCacheExec,
    ];

    /// The snake_case name (as in configuration and statistics).
    pub const fn name(self) -> &'static str {
        match self {
            Color::Unknown => "unknown",
            Color::Free => "free",
            Color::Zero => "zero",
            Color::KernelCode => "kernel_code",
            Color::KernelData => "kernel_data",
            Color::UserCode => "user_code",
            Color::UserData => "user_data",
            Color::PageTable => "page_table",
            Color::PageCacheData => "page_cache_data",
            Color::PageCacheExec => "page_cache_exec",
        }
    }

    /// Index in [`Color::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A color name that is not one of [`Color::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown color {0:?}: use one of unknown, free, zero, kernel_code, kernel_data, user_code, user_data, page_table, page_cache_data, page_cache_exec")]
pub struct ParseColorError(pub String);

impl FromStr for Color {
    type Err = ParseColorError;

    /// Parse a snake_case name; `-` may stand for `_` and case is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Color::ALL
            .into_iter()
            .find(|c| c.name() == norm)
            .ok_or_else(|| ParseColorError(s.to_string()))
    }
}

/// The cached pages of one file, in file order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FilePages {
    /// Inode number.
    pub ino: u32,
    /// Executable or data.
    pub kind: FileKind,
    /// Path.
    pub name: String,
    /// Page indices, ascending.
    pub index: Vec<u64>,
    /// The frame of each index (same length as `index`).
    pub gfns: Vec<Gfn>,
}

/// User frames seen per process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessStats {
    /// Process id.
    pub pid: u32,
    /// Program name.
    pub name: String,
    /// Frames mapped executable (counted per mapping).
    pub code_frames: u64,
    /// Frames mapped non-executable.
    pub data_frames: u64,
}

/// Time spent in each phase, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    /// Reading the descriptor-level information (roots, files, image, ranges).
    pub profile_us: u64,
    /// Page-table walks.
    pub walk_us: u64,
    /// Page-cache radix trees.
    pub cache_us: u64,
    /// Allocator bitmap.
    pub allocator_us: u64,
    /// Zero-page scan.
    pub zero_us: u64,
    /// Whole pass.
    pub total_us: u64,
}

/// Statistics of a coloring pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ColorStats {
    /// Profile used.
    pub profile: String,
    /// Frames colored.
    pub frames: u64,
    /// Frames per color.
    pub counts: BTreeMap<Color, u64>,
    /// Frames whose content is all zero (whatever their color, free ones included).
    pub zero_frames: u64,
    /// Processes walked.
    pub processes: Vec<ProcessStats>,
    /// Files with cached pages.
    pub files: u64,
    /// Cached pages found.
    pub cached_pages: u64,
    /// Walk counters over all roots.
    pub walk: WalkStats,
    /// Roots that could not be walked (outside RAM).
    pub bad_roots: u64,
    /// Supervisor mappings in the lower half (ignored, e.g. a boot identity map).
    pub low_supervisor_leaves: u64,
    /// What the profile tolerated.
    pub anomalies: ProfileAnomalies,
    /// Phase times.
    pub timings: Timings,
}

/// The colors of every frame of one memory generation.
#[derive(Clone, Debug, Default)]
pub struct ColorMap {
    /// One color per frame.
    pub colors: Vec<Color>,
    /// Frames whose content is all zero (free ones included). Zero-filling them is exact,
    /// whatever their color (policies use it for allocation on demand).
    pub zero: FrameSet,
    /// Per file, its cached frames in file order.
    pub file_pages: Vec<FilePages>,
    /// Statistics.
    pub stats: ColorStats,
}

impl ColorMap {
    /// A map from explicit colors (for synthetic inputs and tests); statistics are counted.
    pub fn from_colors(colors: Vec<Color>, zero: FrameSet, file_pages: Vec<FilePages>) -> Self {
        let mut stats = ColorStats {
            profile: "explicit".into(),
            ..ColorStats::default()
        };
        stats.frames = colors.len() as u64;
        stats.counts = count_colors(&colors);
        stats.zero_frames = zero.len();
        stats.files = file_pages.len() as u64;
        stats.cached_pages = file_pages.iter().map(|f| f.gfns.len() as u64).sum();
        ColorMap {
            colors,
            zero,
            file_pages,
            stats,
        }
    }

    /// Number of frames.
    pub fn frames(&self) -> u64 {
        self.colors.len() as u64
    }

    /// Color of `gfn` ([`Color::Unknown`] beyond the map).
    pub fn color(&self, gfn: Gfn) -> Color {
        usize::try_from(gfn)
            .ok()
            .and_then(|i| self.colors.get(i))
            .copied()
            .unwrap_or(Color::Unknown)
    }

    /// True if `gfn` can be served as a zero page: free, or all-zero content.
    pub fn zero_fillable(&self, gfn: Gfn) -> bool {
        matches!(self.color(gfn), Color::Free | Color::Zero) || self.zero.contains(gfn)
    }

    /// For every cached frame, its file (index in `file_pages`) and position in that file's
    /// page list.
    pub fn file_positions(&self) -> HashMap<Gfn, (usize, usize)> {
        let mut m = HashMap::new();
        for (f, fp) in self.file_pages.iter().enumerate() {
            for (pos, &g) in fp.gfns.iter().enumerate() {
                m.entry(g).or_insert((f, pos));
            }
        }
        m
    }
}

fn count_colors(colors: &[Color]) -> BTreeMap<Color, u64> {
    let mut n = [0u64; Color::COUNT];
    for c in colors {
        n[c.index()] += 1;
    }
    Color::ALL
        .into_iter()
        .filter(|c| n[c.index()] > 0)
        .map(|c| (c, n[c.index()]))
        .collect()
}

/// Errors of a coloring pass.
#[derive(Debug, thiserror::Error)]
pub enum ColorError {
    /// The profile could not read the guest.
    #[error("coloring failed: {0}")]
    Profile(#[from] ProfileError),
}

/// Options of a coloring pass.
#[derive(Clone, Debug)]
pub struct ColorOptions {
    /// Extra roots walked after the profile's (e.g. each vCPU's CR3).
    pub extra_roots: Vec<u64>,
    /// Scan content for zero pages (the most expensive phase: reads every frame, stopping at
    /// the first non-zero 64 bytes).
    pub scan_zero: bool,
}

impl Default for ColorOptions {
    fn default() -> Self {
        ColorOptions {
            extra_roots: Vec::new(),
            scan_zero: true,
        }
    }
}

// Evidence bits per frame.
const E_PT: u16 = 1 << 0;
const E_TEXT: u16 = 1 << 1;
const E_IMG_DATA: u16 = 1 << 2;
const E_USER_EXEC: u16 = 1 << 3;
const E_PC_EXEC: u16 = 1 << 4;
const E_PC_DATA: u16 = 1 << 5;
const E_USER_DATA: u16 = 1 << 6;
const E_KERN_EXEC: u16 = 1 << 7;
const E_KERN_DATA: u16 = 1 << 8;
const E_FREE: u16 = 1 << 9;
const E_IN_USE: u16 = 1 << 10;
const E_KERN_OWNED: u16 = 1 << 11;

/// Decide a frame's color from its evidence (the precedence table of the crate docs).
fn resolve(e: u16, zero: bool) -> Color {
    if e & E_PT != 0 {
        Color::PageTable
    } else if e & E_TEXT != 0 {
        Color::KernelCode
    } else if e & E_IMG_DATA != 0 {
        Color::KernelData
    } else if e & E_USER_EXEC != 0 {
        Color::UserCode
    } else if e & E_PC_EXEC != 0 {
        Color::PageCacheExec
    } else if e & E_PC_DATA != 0 {
        Color::PageCacheData
    } else if e & E_USER_DATA != 0 {
        Color::UserData
    } else if e & E_KERN_EXEC != 0 {
        Color::KernelCode
    } else if e & (E_KERN_DATA | E_KERN_OWNED) != 0 {
        Color::KernelData
    } else if e & E_FREE != 0 {
        Color::Free
    } else if zero {
        Color::Zero
    } else if e & E_IN_USE != 0 {
        Color::KernelData
    } else {
        Color::Unknown
    }
}

fn micros(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

struct Pass<'a> {
    ev: Vec<u16>,
    ignored: &'a [Range<u64>],
    low_supervisor: u64,
}

impl Pass<'_> {
    fn mark(&mut self, gfn: Gfn, bit: u16) {
        if let Some(e) = usize::try_from(gfn).ok().and_then(|i| self.ev.get_mut(i)) {
            *e |= bit;
        }
    }

    /// Record a leaf; returns (code frames, data frames) attributed to a user process.
    fn leaf(&mut self, m: &Mapping) -> (u64, u64) {
        let bit = if m.va < KERNEL_HALF {
            if !m.flags.user {
                self.low_supervisor += 1;
                return (0, 0);
            }
            if m.flags.nx {
                E_USER_DATA
            } else {
                E_USER_EXEC
            }
        } else if m.flags.nx {
            E_KERN_DATA
        } else {
            E_KERN_EXEC
        };
        // Frame offsets of the leaf outside the ignored ranges (a large leaf may straddle
        // the edge of one, e.g. a 2 MiB mapping of the kernel image window).
        let nframes = m.size.frames();
        let va_end = m.va.saturating_add(m.size.bytes());
        let mut keep = vec![(0u64, nframes)];
        for r in self
            .ignored
            .iter()
            .filter(|r| r.start < va_end && m.va < r.end)
        {
            let cut_start = (r.start.max(m.va) - m.va) / 4096;
            let cut_end = (r.end.min(va_end) - m.va).div_ceil(4096);
            keep = keep
                .into_iter()
                .flat_map(|(a, b)| [(a, b.min(cut_start)), (a.max(cut_end), b)])
                .filter(|(a, b)| a < b)
                .collect();
        }
        let first = m.pa / 4096;
        let frames = self.ev.len() as u64;
        let mut n = 0;
        for (a, b) in keep {
            let (s, e) = (
                first.saturating_add(a).min(frames),
                first.saturating_add(b).min(frames),
            );
            for g in s..e {
                self.ev[g as usize] |= bit;
            }
            n += e - s;
        }
        match bit {
            E_USER_EXEC => (n, 0),
            E_USER_DATA => (0, n),
            _ => (0, 0),
        }
    }
}

/// Color every frame of `mem` with the help of `profile`.
pub fn color<M: PhysMem + ?Sized, P: GuestProfile + ?Sized>(
    mem: &M,
    profile: &P,
    opts: &ColorOptions,
) -> Result<ColorMap, ColorError> {
    let t0 = Instant::now();
    let frames = frame_count(mem);
    let mut stats = ColorStats {
        profile: profile.name().to_string(),
        frames,
        ..ColorStats::default()
    };

    let t = Instant::now();
    let kernel_roots = profile.kernel_roots()?;
    let processes = profile.processes()?;
    let image = profile.kernel_image()?;
    let ignored = profile.ignored_ranges()?;
    let files = profile.files()?;
    stats.timings.profile_us = micros(t);

    let mut pass = Pass {
        ev: vec![0u16; frames as usize],
        ignored: &ignored,
        low_supervisor: 0,
    };
    for r in &image {
        let bit = if r.section == Section::Text {
            E_TEXT
        } else {
            E_IMG_DATA
        };
        for g in r.gfns.clone() {
            pass.mark(g, bit);
        }
    }

    // Page tables: kernel roots first (the kernel half of every process shares their
    // subtrees, which are then walked once), then processes, then extra roots.
    let t = Instant::now();
    let mut visited = Visited::new(frames);
    let roots = kernel_roots
        .iter()
        .map(|&r| (r, None))
        .chain(processes.iter().map(|p| (p.cr3, Some(p))))
        .chain(opts.extra_roots.iter().map(|&r| (r, None)));
    for (root, proc_) in roots {
        let (mut code, mut data) = (0, 0);
        let res = walk(mem, root, &mut visited, &mut |e| match e {
            WalkEvent::Table(t) => pass.mark(t.gfn, E_PT),
            WalkEvent::Leaf(m) => {
                let (c, d) = pass.leaf(&m);
                code += c;
                data += d;
            }
        });
        match res {
            Ok(ws) => stats.walk.add(&ws),
            Err(_) => stats.bad_roots += 1,
        }
        if let Some(p) = proc_ {
            stats.processes.push(ProcessStats {
                pid: p.pid,
                name: p.name.clone(),
                code_frames: code,
                data_frames: data,
            });
        }
    }
    stats.low_supervisor_leaves = pass.low_supervisor;
    stats.timings.walk_us = micros(t);

    let t = Instant::now();
    let mut file_pages = Vec::new();
    for f in &files {
        let pages = profile.file_pages(f)?;
        if pages.is_empty() {
            continue;
        }
        let bit = if f.kind == FileKind::Exec {
            E_PC_EXEC
        } else {
            E_PC_DATA
        };
        let mut fp = FilePages {
            ino: f.ino,
            kind: f.kind,
            name: f.name.clone(),
            index: Vec::with_capacity(pages.len()),
            gfns: Vec::with_capacity(pages.len()),
        };
        for (i, g) in pages {
            if g < frames {
                pass.mark(g, bit);
                fp.index.push(i);
                fp.gfns.push(g);
            }
        }
        stats.cached_pages += fp.gfns.len() as u64;
        file_pages.push(fp);
    }
    stats.files = file_pages.len() as u64;
    stats.timings.cache_us = micros(t);

    let t = Instant::now();
    if let Some(roles) = profile.frame_roles()? {
        for (set, bit) in [
            (&roles.page_table, E_PT),
            (&roles.anon, E_USER_DATA),
            (&roles.kernel, E_KERN_OWNED),
        ] {
            for g in set.iter() {
                pass.mark(g, bit);
            }
        }
    }
    if let Some(in_use) = profile.frames_in_use()? {
        for (g, e) in pass.ev.iter_mut().enumerate() {
            *e |= if in_use.contains(g as u64) {
                E_IN_USE
            } else {
                E_FREE
            };
        }
    }
    stats.timings.allocator_us = micros(t);

    let t = Instant::now();
    let mut zero = FrameSet::new(frames);
    let mut colors = Vec::with_capacity(frames as usize);
    for (g, &e) in pass.ev.iter().enumerate() {
        let g = g as u64;
        let is_zero = opts.scan_zero && page_is_zero(mem, g).unwrap_or(false);
        if is_zero {
            zero.insert(g);
        }
        colors.push(resolve(e, is_zero));
    }
    stats.timings.zero_us = micros(t);

    stats.counts = count_colors(&colors);
    stats.zero_frames = zero.len();
    stats.anomalies = profile.anomalies();
    stats.timings.total_us = micros(t0);
    Ok(ColorMap {
        colors,
        zero,
        file_pages,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_table() {
        let z = false;
        assert_eq!(
            resolve(E_PT | E_TEXT | E_USER_EXEC | E_FREE, z),
            Color::PageTable
        );
        assert_eq!(resolve(E_TEXT | E_KERN_DATA, z), Color::KernelCode);
        assert_eq!(resolve(E_IMG_DATA | E_KERN_EXEC, z), Color::KernelData);
        assert_eq!(
            resolve(E_USER_EXEC | E_PC_EXEC | E_USER_DATA, z),
            Color::UserCode
        );
        assert_eq!(resolve(E_PC_EXEC | E_USER_DATA, z), Color::PageCacheExec);
        assert_eq!(
            resolve(E_PC_DATA | E_USER_DATA | E_KERN_DATA, z),
            Color::PageCacheData
        );
        assert_eq!(
            resolve(E_USER_DATA | E_KERN_EXEC | E_FREE, true),
            Color::UserData
        );
        assert_eq!(resolve(E_KERN_EXEC | E_KERN_DATA, z), Color::KernelCode);
        assert_eq!(resolve(E_KERN_DATA | E_FREE, true), Color::KernelData);
        assert_eq!(resolve(E_KERN_OWNED | E_IN_USE, true), Color::KernelData);
        assert_eq!(resolve(E_KERN_OWNED | E_USER_EXEC, z), Color::UserCode);
        assert_eq!(resolve(E_FREE, true), Color::Free);
        assert_eq!(resolve(E_IN_USE, true), Color::Zero);
        assert_eq!(resolve(E_IN_USE, false), Color::KernelData);
        assert_eq!(resolve(0, true), Color::Zero);
        assert_eq!(resolve(0, false), Color::Unknown);
    }

    #[test]
    fn leaves_are_clipped_to_ram_and_outside_ignored_ranges() {
        use crate::pagewalk::{PageSize, PteFlags};
        let base = 0xffff_ffff_8000_0000u64;
        // Ignore the image window outside the image [base + 1 MiB, base + 1 MiB + 12 KiB).
        let ignored = [base..base + 0x10_0000, base + 0x10_3000..u64::MAX];
        let mut pass = Pass {
            ev: vec![0; 1024],
            ignored: &ignored,
            low_supervisor: 0,
        };
        let flags = PteFlags::default();
        // A 2 MiB executable leaf at the base of the window maps frames 0..512.
        pass.leaf(&Mapping {
            va: base,
            pa: 0,
            size: PageSize::Size2M,
            flags,
        });
        let marked: Vec<usize> = (0..1024)
            .filter(|&g| pass.ev[g] & E_KERN_EXEC != 0)
            .collect();
        assert_eq!(marked, vec![256, 257, 258]);
        // A 1 GiB user leaf is clipped to RAM; a supervisor low leaf is ignored.
        let user = PteFlags {
            user: true,
            nx: true,
            ..flags
        };
        assert_eq!(
            pass.leaf(&Mapping {
                va: 1 << 30,
                pa: 0,
                size: PageSize::Size1G,
                flags: user
            }),
            (0, 1024)
        );
        assert_eq!(
            pass.leaf(&Mapping {
                va: 0,
                pa: 0,
                size: PageSize::Size2M,
                flags
            }),
            (0, 0)
        );
        assert_eq!(pass.low_supervisor, 1);
        // A leaf at the very top of the address space does not overflow.
        pass.leaf(&Mapping {
            va: 0xffff_ffff_ffe0_0000,
            pa: 0,
            size: PageSize::Size2M,
            flags,
        });
    }

    #[test]
    fn color_names_roundtrip() {
        for c in Color::ALL {
            assert_eq!(c.name().parse::<Color>().unwrap(), c);
            assert_eq!(Color::ALL[c.index()], c);
        }
        assert_eq!(
            "Page-Cache-Exec".parse::<Color>().unwrap(),
            Color::PageCacheExec
        );
        assert!("purple".parse::<Color>().is_err());
        // The serde name must match `name()` (statistics are keyed by it).
        for c in Color::ALL {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
    }

    #[test]
    fn explicit_map_helpers() {
        let mut zero = FrameSet::new(4);
        zero.insert(3);
        let fp = FilePages {
            ino: 1,
            kind: FileKind::Data,
            name: "/d".into(),
            index: vec![0, 2],
            gfns: vec![2, 1],
        };
        let m = ColorMap::from_colors(
            vec![
                Color::Free,
                Color::PageCacheData,
                Color::PageCacheData,
                Color::UserData,
            ],
            zero,
            vec![fp],
        );
        assert!(m.zero_fillable(0) && m.zero_fillable(3) && !m.zero_fillable(1));
        assert_eq!(m.color(99), Color::Unknown);
        assert_eq!(m.file_positions()[&1], (0, 1));
        assert_eq!(m.stats.counts[&Color::PageCacheData], 2);
    }
}
