//! End-to-end tests on the host: the guest logic over the generated files, answers checked
//! against the independent references.

use super::*;

fn run_mix(w: Workload, opts: &ImageOptions, n: usize) -> usize {
    let mut h = host_handler(w, opts);
    let mut ok = 0;
    for req in requests(w, opts, 3, n) {
        let (status, resp) = h.handle(&req);
        assert_eq!(
            status,
            0,
            "{w:?} {:?}: {}",
            String::from_utf8_lossy(&req),
            String::from_utf8_lossy(resp)
        );
        if let Err(e) = check(w, opts, &req, resp) {
            panic!("{w:?} request {:?}: {e}", String::from_utf8_lossy(&req));
        }
        ok += 1;
    }
    ok
}

#[test]
fn web_mix_checks() {
    assert_eq!(run_mix(Workload::Web, &ImageOptions::tiny(), 400), 400);
}

#[test]
fn olap_mix_checks() {
    assert_eq!(run_mix(Workload::Olap, &ImageOptions::tiny(), 20), 20);
}

#[test]
fn function_mixes_check() {
    let opts = ImageOptions::tiny();
    for w in [
        Workload::Json,
        Workload::Aes,
        Workload::Matmul,
        Workload::Compress,
    ] {
        assert_eq!(run_mix(w, &opts, 6), 6);
    }
}

#[test]
fn checks_reject_wrong_answers() {
    let opts = ImageOptions::tiny();
    for w in Workload::ALL {
        let req = &requests(w, &opts, 9, 1)[0];
        let mut h = host_handler(w, &opts);
        let (_, resp) = h.handle(req);
        let mut bad = resp.to_vec();
        // Corrupt one byte in the middle of the answer.
        let at = bad.len() / 2;
        bad[at] = bad[at].wrapping_add(1);
        if w == Workload::Web
            && bad
                .windows(4)
                .position(|x| x == b"\r\n\r\n")
                .is_some_and(|p| at < p)
        {
            continue; // a header byte: may still be a valid response
        }
        assert!(
            check(w, &opts, req, &bad).is_err(),
            "{w:?} accepted a corrupted answer"
        );
        assert!(
            check(w, &opts, req, b"").is_err(),
            "{w:?} accepted an empty answer"
        );
    }
}

#[test]
fn olap_numbers_match_the_reference_on_the_default_query() {
    let opts = ImageOptions::tiny();
    let mut h = host_handler(Workload::Olap, &opts);
    let (st, q1) = h.handle(b"Q1");
    assert_eq!(st, 0);
    let q1 = String::from_utf8(q1.to_vec()).unwrap();
    assert!(q1.lines().count() >= 5, "{q1}");
    check(Workload::Olap, &opts, b"Q1", q1.as_bytes()).unwrap();
    let (st, msg) = h.handle(b"Q99");
    assert_eq!(
        st,
        crate::handlers::STATUS_BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(msg)
    );
}

#[test]
fn q6_scans_only_its_year() {
    let opts = ImageOptions::tiny();
    let mut h = host_handler(Workload::Olap, &opts);
    let (_, r) = h.handle(b"Q6 date=1994-01-01 discount=0.06 quantity=24");
    let first = String::from_utf8(r.to_vec()).unwrap();
    let scanned: u64 = first
        .lines()
        .next()
        .unwrap()
        .rsplit('=')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let year = dataset(&opts)
        .lineitem
        .iter()
        .filter(|r| (8766..9131).contains(&r.shipdate))
        .count() as u64;
    assert_eq!(scanned, year, "zone map should restrict the scan to 1994");
}

#[test]
fn image_holds_programs_and_data() {
    let opts = ImageOptions::tiny();
    let img = build_image(
        &opts,
        &[("web", b"\x7fELF-not-really"), ("/bin/ktest", b"\x7fELF")],
    );
    let files = kscope_guest::mkfs::list(&img).unwrap();
    assert_eq!(
        (files[0].0.as_str(), files[1].0.as_str()),
        ("/bin/web", "/bin/ktest")
    );
    assert_eq!(files[0].1, file_kind::EXEC);
    let d = dataset(&opts);
    assert_eq!(files.len(), 2 + d.files.len());
    for (p, k, bytes) in &files[2..] {
        assert_eq!(*k, file_kind::DATA);
        assert_eq!(d.file(p).unwrap(), *bytes, "{p}");
    }
    assert!(try_build_image(
        &opts,
        &[(
            "a/very/long/name/that/does/not/fit/in/the/sixty/four/bytes/of/a/name",
            b""
        )]
    )
    .is_err());
}

#[test]
fn default_data_fits_a_small_vm() {
    let d = dataset(&ImageOptions::default());
    let total: usize = d.files.iter().map(|(_, b)| b.len()).sum();
    assert!(total < 24 << 20, "default data is {total} bytes");
    eprintln!("default data: {} files, {total} bytes", d.files.len());
    let li = d.file(tpch::LINEITEM_PATH).unwrap().len();
    assert!((2 << 20..8 << 20).contains(&li), "lineitem is {li} bytes");
}
