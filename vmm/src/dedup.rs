//! Support for deduplication experiments (Kaleidoscope's color-targeted dedup).
//!
//! - [`Vm::fault_server`]: a lazy VM's fault server, whose first-fault order and present set
//!   are what working-set recordings and wasted-prefetch accounting need.
//! - [`Vm::mark_mergeable`]: `madvise(MADV_MERGEABLE)` on chosen frames of a clone's *live*
//!   memory (clones made with [`CloneOptions::anon_memory`](crate::CloneOptions)), so that KSM
//!   shares them copy-on-write while the clone keeps running.
//! - [`AnonFrames`]: anonymous private memory holding guest frames, with
//!   `madvise(MADV_MERGEABLE)` on chosen runs: what Linux KSM can merge copy-on-write.
//! - [`Ksm`]: control and counters of the host's KSM daemon (`/sys/kernel/mm/ksm`); the
//!   previous settings are restored on drop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::VmError;
use crate::hostmem::Mapping;
use crate::lazy::{FaultServer, RegionKind, PAGE_SIZE};
use crate::prefetch::Gfn;
use crate::vm::Vm;

/// Errors of the dedup support.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// A memory system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A frame index or length is out of range.
    #[error("frames {start}..{end} are outside the {pages}-frame region")]
    Range {
        /// First frame.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Frames of the region.
        pages: u64,
    },
    /// KSM is not available or not controllable.
    #[error("KSM at {path}: {source}; run as root on a kernel built with CONFIG_KSM")]
    Ksm {
        /// The sysfs file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// KSM did not finish the requested scans in time.
    #[error("KSM completed {done} of {wanted} full scans in {secs:.1} s; raise the time limit or pages_to_scan")]
    Timeout {
        /// Full scans completed.
        done: u64,
        /// Full scans wanted.
        wanted: u64,
        /// Seconds waited.
        secs: f64,
    },
}

impl Vm {
    /// The fault server of a lazily served VM (`None` for a booted, eager or restored-eager
    /// VM): its [`touched`](FaultServer::touched) list is the first-fault order,
    /// [`present_bitmap`](FaultServer::present_bitmap) what was installed.
    pub fn fault_server(&self) -> Option<&Arc<FaultServer>> {
        self.lazy.as_ref()
    }

    /// Mark frames `gfns` of this VM's live memory mergeable by KSM (`MADV_MERGEABLE`, one call
    /// per run of consecutive frames; duplicates and order do not matter). Returns the number
    /// of distinct frames marked. Only clones created with
    /// [`CloneOptions::anon_memory`](crate::CloneOptions) have anonymous memory KSM can merge;
    /// any other VM (memfd-backed) is an error.
    pub fn mark_mergeable(&self, gfns: &[Gfn]) -> Result<usize, VmError> {
        let server = self
            .lazy
            .as_ref()
            .filter(|s| s.region().kind() == RegionKind::AnonPrivate)
            .ok_or_else(|| {
                VmError::BadConfig(format!(
                    "{} is memfd-backed (MAP_SHARED), which KSM does not merge; create it as a \
                     clone with CloneOptions.anon_memory = true",
                    self.name()
                ))
            })?;
        let mut v = gfns.to_vec();
        v.sort_unstable();
        v.dedup();
        let mut run: Option<(Gfn, u64)> = None;
        for &g in &v {
            run = match run {
                Some((s, n)) if s + n == g => Some((s, n + 1)),
                Some((s, n)) => {
                    server.region().mergeable(s, n)?;
                    Some((g, 1))
                }
                None => Some((g, 1)),
            };
        }
        if let Some((s, n)) = run {
            server.region().mergeable(s, n)?;
        }
        Ok(v.len())
    }
}

/// Anonymous private memory of `pages` frames (`MAP_PRIVATE | MAP_ANONYMOUS`), the only kind
/// KSM merges.
#[derive(Debug)]
pub struct AnonFrames {
    map: Mapping,
    pages: u64,
}

impl AnonFrames {
    /// Map `pages` zero frames.
    pub fn new(pages: u64) -> Result<Self, DedupError> {
        let len = Self::bytes(pages)?;
        let map = Mapping::new(None, len, true, false).map_err(|source| DedupError::Os {
            op: format!("mmap of {pages} anonymous frames"),
            source,
        })?;
        Ok(AnonFrames { map, pages })
    }

    fn bytes(pages: u64) -> Result<usize, DedupError> {
        usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .filter(|&b| b > 0)
            .ok_or(DedupError::Range {
                start: 0,
                end: pages,
                pages,
            })
    }

    /// Frames mapped.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn check(&self, start: u64, n: u64) -> Result<(), DedupError> {
        match start.checked_add(n) {
            Some(end) if end <= self.pages => Ok(()),
            _ => Err(DedupError::Range {
                start,
                end: start.saturating_add(n),
                pages: self.pages,
            }),
        }
    }

    /// Write one frame.
    pub fn write_frame(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> Result<(), DedupError> {
        self.check(gfn, 1)?;
        self.map
            .write(gfn as usize * PAGE_SIZE, data)
            .map_err(|source| DedupError::Os {
                op: format!("write frame {gfn}"),
                source,
            })
    }

    /// Read one frame.
    pub fn read_frame(&self, gfn: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), DedupError> {
        self.check(gfn, 1)?;
        self.map
            .read(gfn as usize * PAGE_SIZE, out)
            .map_err(|source| DedupError::Os {
                op: format!("read frame {gfn}"),
                source,
            })
    }

    /// Mark frames `start..start + n` mergeable by KSM (`MADV_MERGEABLE`).
    pub fn mergeable(&self, start: u64, n: u64) -> Result<(), DedupError> {
        self.check(start, n)?;
        self.map
            .advise(
                start as usize * PAGE_SIZE,
                n as usize * PAGE_SIZE,
                libc::MADV_MERGEABLE,
            )
            .map_err(|source| DedupError::Os {
                op: format!("madvise(MADV_MERGEABLE) of frames {start}+{n}"),
                source,
            })
    }
}

/// KSM counters (see the kernel's `Documentation/admin-guide/mm/ksm.rst`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmCounters {
    /// Shared pages in use (one per group of identical pages).
    pub pages_shared: u64,
    /// Pages sharing them (the saving).
    pub pages_sharing: u64,
    /// Pages scanned but changing too fast to merge.
    pub pages_volatile: u64,
    /// Completed full scans of all mergeable memory.
    pub full_scans: u64,
    /// Pages scanned so far (0 on kernels without the counter).
    pub pages_scanned: u64,
}

const KSM: &str = "/sys/kernel/mm/ksm";

/// The host's KSM daemon. Dropping stops it (unmerging is left to munmap) and restores the
/// previous `run`, `pages_to_scan` and `sleep_millisecs`.
#[derive(Debug)]
pub struct Ksm {
    saved: Vec<(&'static str, String)>,
}

impl Ksm {
    fn read(name: &str) -> Result<String, DedupError> {
        let path = format!("{KSM}/{name}");
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|source| DedupError::Ksm { path, source })
    }

    fn write(name: &str, v: &str) -> Result<(), DedupError> {
        let path = format!("{KSM}/{name}");
        std::fs::write(&path, v).map_err(|source| DedupError::Ksm { path, source })
    }

    fn num(name: &str) -> Result<u64, DedupError> {
        let s = Self::read(name)?;
        s.parse().map_err(|_| DedupError::Ksm {
            path: format!("{KSM}/{name}"),
            source: std::io::Error::other(format!("not a number: {s:?}")),
        })
    }

    /// Take control of KSM (saving its settings) with the daemon stopped.
    pub fn open() -> Result<Self, DedupError> {
        let mut saved = Vec::new();
        for name in ["run", "pages_to_scan", "sleep_millisecs"] {
            saved.push((name, Self::read(name)?));
        }
        Self::write("run", "0")?;
        Ok(Ksm { saved })
    }

    /// Current counters.
    pub fn counters(&self) -> Result<KsmCounters, DedupError> {
        Ok(KsmCounters {
            pages_shared: Self::num("pages_shared")?,
            pages_sharing: Self::num("pages_sharing")?,
            pages_volatile: Self::num("pages_volatile")?,
            full_scans: Self::num("full_scans")?,
            pages_scanned: Self::num("pages_scanned").unwrap_or(0),
        })
    }

    /// Run the daemon (`pages_to_scan` per wake-up, no sleep between) until it has completed
    /// `scans` more full scans, then stop it. Returns the wall time it ran.
    pub fn scan(
        &self,
        pages_to_scan: u64,
        scans: u64,
        limit: Duration,
    ) -> Result<Duration, DedupError> {
        let start_scans = self.counters()?.full_scans;
        Self::write("pages_to_scan", &pages_to_scan.to_string())?;
        Self::write("sleep_millisecs", "0")?;
        let t0 = Instant::now();
        Self::write("run", "1")?;
        let result = loop {
            let done = self.counters()?.full_scans.saturating_sub(start_scans);
            if done >= scans {
                break Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                break Err(DedupError::Timeout {
                    done,
                    wanted: scans,
                    secs: t0.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Self::write("run", "0")?;
        result
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        let _ = Self::write("run", "0");
        for (name, v) in self.saved.iter().rev() {
            let _ = Self::write(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anon_frames_round_trip_and_bounds() {
        let mut m = AnonFrames::new(4).unwrap();
        let mut page = [7u8; PAGE_SIZE];
        m.write_frame(3, &page).unwrap();
        page = [0; PAGE_SIZE];
        m.read_frame(3, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 7));
        m.read_frame(0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        assert!(m.write_frame(4, &page).is_err());
        assert!(m.mergeable(2, 3).is_err());
        m.mergeable(0, 4).unwrap();
    }
}
