//! Policies built from a real coloring pass over a synthetic kscope guest.

use kscope_colorer::synth::{build as build_guest, SynthSpec};
use kscope_colorer::{color_kscope, Color};
use kscope_policies::sim::simulate;
use kscope_policies::{build, Fault, FaultPlan, Fill, Gfn, PolicyConfig};

#[test]
fn kaleidoscope_follows_the_colorers_file_order_and_colors() {
    let g = build_guest(&SynthSpec::small()).unwrap();
    let map = color_kscope(&g.mem, None).unwrap();
    let cfg = PolicyConfig::default();
    let mut p = build("kaleidoscope", &map, None, &cfg).unwrap();

    // Data file /data/b.tbl (40 pages, physically scattered): a fault on index 3 reads ahead
    // indices 4..=11 in file order.
    let (_, _, pages) = &g.files[2];
    let mut plan = FaultPlan::default();
    p.on_fault(
        Fault {
            gfn: pages[3].1,
            write: false,
        },
        &mut plan,
    );
    let want: Vec<Gfn> = pages[4..12].iter().map(|x| x.1).collect();
    let out: Vec<Gfn> = plan.prefetch.iter().map(|i| i.gfn).collect();
    assert_eq!(out, want);
    assert!(
        want.windows(2).any(|w| w[1] != w[0] + 1),
        "pages are interwoven physically"
    );

    // Page tables and kernel code before resume; free frames zero-filled.
    let before: Vec<Gfn> = p.before_resume().into_iter().map(|i| i.gfn).collect();
    for (gfn, c) in map.colors.iter().enumerate() {
        let gfn = gfn as u64;
        let eager = matches!(c, Color::PageTable | Color::KernelCode) && !map.zero.contains(gfn);
        assert_eq!(
            before.binary_search(&gfn).is_ok(),
            eager,
            "frame {gfn} ({c})"
        );
        if *c == Color::Free {
            let mut plan = FaultPlan::default();
            p.on_fault(Fault { gfn, write: false }, &mut plan);
            assert_eq!(plan.fault, Fill::Zero, "free frame {gfn}");
        }
    }
}

#[test]
fn kaleidoscope_wastes_less_than_blind_on_a_scan_of_a_scattered_file() {
    let g = build_guest(&SynthSpec::scaled(64 << 20)).unwrap();
    let map = color_kscope(&g.mem, None).unwrap();
    let frames = map.frames();
    let cfg = PolicyConfig::default();
    // Trace: scan a data file (614 cached pages, physically scattered) in file order.
    let (_, _, pages) = &g.files[5];
    let trace: Vec<Gfn> = pages.iter().map(|x| x.1).collect();
    assert!(trace.len() > 500);
    let run = |name: &str| {
        let mut p = build(name, &map, Some(&trace), &cfg).unwrap();
        simulate(p.as_mut(), frames, &trace, 4)
    };
    let lazy = run("lazy");
    let blind = run("blind");
    let kal = run("kaleidoscope");
    assert_eq!(lazy.faults, trace.len() as u64);
    assert!(kal.faults * 8 < lazy.faults, "{kal:?}");
    assert!(blind.faults > kal.faults * 4, "{blind:?} vs {kal:?}");
    assert!(blind.wasted > kal.wasted, "{blind:?} vs {kal:?}");
    eprintln!("lazy {lazy:?}\nblind {blind:?}\nkaleidoscope {kal:?}");
    let reap = run("reap");
    assert_eq!((reap.faults, reap.wasted), (0, 0));
}
