//! A small hand-made color map shared by the policy tests (48 frames, interwoven colors).
//!
//! ```text
//! gfn  0 PT   1 KC   2 KC   3 PT   4 UD   5 UD   6 KD   7 UD*  8 UD   9 F*  10 UD  11 UD
//! gfn 12 PCD 13 PCD 14 UC  15 PCD 16 UC  17 F   18 UC  19 PCE 20 PCE 21 UC 22 PCE 23 Z*
//! gfn 24 PCD 25 PCD 26 PCD* 27 KD 28 PCD 29 PCD 30 PCD 31 PCD 32..40 F except 35 KD
//! gfn 40 UD  41 F   42 UD  43 F   44 UD  45 UD  46 UD  47 UD          (* = all-zero)
//! file 0 (data): 13 15 12 24 25 26 28 29 30 31     file 1 (exec): 19 20 21 22
//! ```

use kscope_colorer::{Color, ColorMap, FileKind, FilePages, FrameSet};

pub(crate) fn map() -> ColorMap {
    use Color::*;
    let mut colors = vec![Free; 48];
    let set = [
        (0, PageTable),
        (1, KernelCode),
        (2, KernelCode),
        (3, PageTable),
        (4, UserData),
        (5, UserData),
        (6, KernelData),
        (7, UserData),
        (8, UserData),
        (10, UserData),
        (11, UserData),
        (12, PageCacheData),
        (13, PageCacheData),
        (14, UserCode),
        (15, PageCacheData),
        (16, UserCode),
        (18, UserCode),
        (19, PageCacheExec),
        (20, PageCacheExec),
        (21, UserCode),
        (22, PageCacheExec),
        (23, Zero),
        (24, PageCacheData),
        (25, PageCacheData),
        (26, PageCacheData),
        (27, KernelData),
        (28, PageCacheData),
        (29, PageCacheData),
        (30, PageCacheData),
        (31, PageCacheData),
        (35, KernelData),
        (40, UserData),
        (42, UserData),
        (44, UserData),
        (45, UserData),
        (46, UserData),
        (47, UserData),
    ];
    for (g, c) in set {
        colors[g] = c;
    }
    let mut zero = FrameSet::new(48);
    for g in [7, 9, 23, 26] {
        zero.insert(g);
    }
    let files = vec![
        FilePages {
            ino: 5,
            kind: FileKind::Data,
            name: "/data/a".into(),
            index: (0..10).collect(),
            gfns: vec![13, 15, 12, 24, 25, 26, 28, 29, 30, 31],
        },
        FilePages {
            ino: 6,
            kind: FileKind::Exec,
            name: "/bin/x".into(),
            index: vec![0, 1, 2, 3],
            gfns: vec![19, 20, 21, 22],
        },
    ];
    ColorMap::from_colors(colors, zero, files)
}
