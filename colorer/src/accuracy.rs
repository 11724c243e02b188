//! Accuracy of a [`ColorMap`] against the guest's ground truth.
//!
//! **This is the only module that reads the ground-truth table** (`KInfo.ground_truth`,
//! [`kscope_guest::abi::kinfo::frame_use`]). The coloring pass never does: the profile API
//! has no accessor for it, and a test checks that no other source file of the crate names it.

use crate::color::{Color, ColorMap};
use crate::kscope::KscopeProfile;
use crate::mem::PhysMem;
use crate::profile::ProfileError;
use kscope_guest::abi::from_bytes;
use kscope_guest::abi::kinfo::{frame_use, GroundTruth, KInfo, KINFO_MAGIC};
use kscope_guest::abi::layout::KINFO_GPA;
use serde::Serialize;
use std::collections::BTreeMap;

/// Errors of accuracy measurement.
#[derive(Debug, thiserror::Error)]
pub enum AccuracyError {
    /// The guest could not be read.
    #[error("cannot read the ground truth: {0}")]
    Profile(#[from] ProfileError),
    /// The guest publishes no ground truth.
    #[error("the guest publishes no ground-truth table (KInfo.ground_truth = 0): build the guest kernel with ground truth enabled")]
    NoGroundTruth,
    /// The table and the map disagree in size.
    #[error("ground truth covers {truth} frames but the color map {colors}: color the same memory generation")]
    SizeMismatch {
        /// Frames in the truth table.
        truth: usize,
        /// Frames in the map.
        colors: usize,
    },
}

/// Number of truth rows (every [`frame_use`] value plus one row for invalid values).
pub const TRUTH_ROWS: usize = frame_use::COUNT as usize + 1;

/// Name of a truth row.
pub fn truth_name(use_: u8) -> &'static str {
    match use_ {
        frame_use::FREE => "free",
        frame_use::BOOT => "boot",
        frame_use::KERNEL_TEXT => "kernel_text",
        frame_use::KERNEL_DATA => "kernel_data",
        frame_use::PAGE_TABLE => "page_table",
        frame_use::USER_CODE => "user_code",
        frame_use::USER_DATA => "user_data",
        frame_use::PAGE_CACHE_DATA => "page_cache_data",
        frame_use::PAGE_CACHE_EXEC => "page_cache_exec",
        _ => "invalid",
    }
}

/// The color a perfect colorer gives a frame of this truth use.
pub fn expected_color(use_: u8) -> Option<Color> {
    Some(match use_ {
        frame_use::FREE => Color::Free,
        frame_use::BOOT => Color::KernelData,
        frame_use::KERNEL_TEXT => Color::KernelCode,
        frame_use::KERNEL_DATA => Color::KernelData,
        frame_use::PAGE_TABLE => Color::PageTable,
        frame_use::USER_CODE => Color::UserCode,
        frame_use::USER_DATA => Color::UserData,
        frame_use::PAGE_CACHE_DATA => Color::PageCacheData,
        frame_use::PAGE_CACHE_EXEC => Color::PageCacheExec,
        _ => return None,
    })
}

/// Precision and recall of one color.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColorScore {
    /// The color.
    pub color: Color,
    /// Frames given this color.
    pub predicted: u64,
    /// Frames whose truth expects this color.
    pub actual: u64,
    /// Frames given this color whose truth expects it.
    pub correct: u64,
    /// correct / predicted (1 if nothing predicted).
    pub precision: f64,
    /// correct / actual (1 if nothing expected).
    pub recall: f64,
}

/// Confusion matrix and scores.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AccuracyReport {
    /// Frames compared.
    pub frames: u64,
    /// Truth use -> color -> frames (rows with no frame omitted).
    pub matrix: BTreeMap<&'static str, BTreeMap<Color, u64>>,
    /// Per color (colors with neither predictions nor expectations omitted).
    pub scores: Vec<ColorScore>,
    /// Fraction of frames whose color is the expected one.
    pub accuracy: f64,
    /// Same, counting a frame colored [`Color::Zero`] or marked zero as correct whatever its
    /// truth (serving it as a zero page is exact, so a prefetcher loses nothing).
    pub accuracy_zero_ok: f64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Compare `map` with a ground-truth table (one word per frame).
pub fn compare(truth: &[GroundTruth], map: &ColorMap) -> Result<AccuracyReport, AccuracyError> {
    if truth.len() != map.colors.len() {
        return Err(AccuracyError::SizeMismatch {
            truth: truth.len(),
            colors: map.colors.len(),
        });
    }
    let mut m = [[0u64; Color::COUNT]; TRUTH_ROWS];
    let (mut ok, mut ok_zero) = (0u64, 0u64);
    for (g, (&t, &c)) in truth.iter().zip(&map.colors).enumerate() {
        let use_ = (t & 0xff) as u8;
        let row = usize::from(use_.min(frame_use::COUNT));
        m[row][c.index()] += 1;
        let hit = expected_color(use_) == Some(c);
        ok += u64::from(hit);
        ok_zero += u64::from(hit || c == Color::Zero || map.zero.contains(g as u64));
    }
    let mut matrix = BTreeMap::new();
    for (row, counts) in m.iter().enumerate() {
        let cols: BTreeMap<Color, u64> = Color::ALL
            .into_iter()
            .filter(|c| counts[c.index()] > 0)
            .map(|c| (c, counts[c.index()]))
            .collect();
        if !cols.is_empty() {
            matrix.insert(truth_name(row as u8), cols);
        }
    }
    let mut scores = Vec::new();
    for c in Color::ALL {
        let predicted: u64 = m.iter().map(|r| r[c.index()]).sum();
        let rows: Vec<usize> = (0..frame_use::COUNT)
            .filter(|&u| expected_color(u) == Some(c))
            .map(usize::from)
            .collect();
        let actual: u64 = rows.iter().map(|&r| m[r].iter().sum::<u64>()).sum();
        let correct: u64 = rows.iter().map(|&r| m[r][c.index()]).sum();
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
    let n = truth.len() as u64;
    Ok(AccuracyReport {
        frames: n,
        matrix,
        scores,
        accuracy: ratio(ok, n),
        accuracy_zero_ok: ratio(ok_zero, n),
    })
}

/// Read the ground-truth table of the kscope guest in `mem` (one word per frame the kernel
/// manages).
pub fn read_ground_truth<M: PhysMem + ?Sized>(mem: &M) -> Result<Vec<GroundTruth>, AccuracyError> {
    let profile = KscopeProfile::open(mem)?;
    let mut buf = vec![0u8; core::mem::size_of::<KInfo>()];
    mem.read(KINFO_GPA, &mut buf).map_err(ProfileError::from)?;
    let k: KInfo = from_bytes(&buf).ok_or(AccuracyError::NoGroundTruth)?;
    if k.magic != KINFO_MAGIC || k.ground_truth == 0 {
        return Err(AccuracyError::NoGroundTruth);
    }
    let n = profile.descriptor().frame_bitmap.1 as usize;
    let mut bytes = vec![0u8; n * 4];
    profile.read_virt(k.ground_truth, &mut bytes, "ground-truth table")?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Read the ground truth of the guest in `mem` and compare `map` with it. If the table covers
/// fewer frames than the map (frames beyond the kernel's), only those frames are compared.
pub fn measure<M: PhysMem + ?Sized>(
    mem: &M,
    map: &ColorMap,
) -> Result<AccuracyReport, AccuracyError> {
    let truth = read_ground_truth(mem)?;
    if truth.len() < map.colors.len() {
        let mut part = map.clone();
        part.colors.truncate(truth.len());
        return compare(&truth, &part);
    }
    compare(&truth, map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::FrameSet;
    use kscope_guest::abi::kinfo::ground_truth;

    #[test]
    fn confusion_and_scores() {
        let truth = vec![
            ground_truth(frame_use::FREE, 0),
            ground_truth(frame_use::USER_CODE, 3),
            ground_truth(frame_use::USER_CODE, 3),
            ground_truth(frame_use::USER_DATA, 3),
            ground_truth(frame_use::BOOT, 0),
            ground_truth(200, 0),
        ];
        let colors = vec![
            Color::Free,
            Color::UserCode,
            Color::PageCacheExec,
            Color::UserCode,
            Color::Zero,
            Color::Unknown,
        ];
        let map = ColorMap::from_colors(colors, FrameSet::new(6), vec![]);
        let r = compare(&truth, &map).unwrap();
        assert_eq!(r.frames, 6);
        assert_eq!(r.matrix["user_code"][&Color::UserCode], 1);
        assert_eq!(r.matrix["user_code"][&Color::PageCacheExec], 1);
        assert_eq!(r.matrix["invalid"][&Color::Unknown], 1);
        let uc = r
            .scores
            .iter()
            .find(|s| s.color == Color::UserCode)
            .unwrap();
        assert_eq!((uc.predicted, uc.actual, uc.correct), (2, 2, 1));
        assert!((uc.precision - 0.5).abs() < 1e-9 && (uc.recall - 0.5).abs() < 1e-9);
        assert!((r.accuracy - 2.0 / 6.0).abs() < 1e-9);
        assert!((r.accuracy_zero_ok - 3.0 / 6.0).abs() < 1e-9);
        assert!(compare(&truth[..5], &map).is_err());
    }
}
