//! Builds the guest kernel (`src/kernel/`) as a freestanding ELF and embeds it, together with
//! the OS test programs (`src/programs/`, ring 3, built with `ulib`).

include!("build_support.rs");

/// OS test programs embedded as `PROGRAMS` (bin name, path in the guest file system).
const PROGRAMS: &[(&str, &str)] = &[("ktest", "/bin/ktest"), ("kcrash", "/bin/kcrash")];

/// Symbols of the precompiled `core` that report panics with `core::fmt` (whose code uses
/// SSE), and `core::fmt` itself. The kernel redirects them with `--wrap` to its own SSE-free report, so that neither
/// they nor the formatting code they reference are linked into the kernel.
fn core_panic_symbols() -> Vec<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("rustc --print sysroot");
    let sysroot = String::from_utf8(out.stdout).expect("sysroot utf8");
    let libdir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(GUEST_TRIPLE)
        .join("lib");
    let rlib = std::fs::read_dir(&libdir)
        .expect("sysroot lib dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("libcore-") && n.ends_with(".rlib")
        })
        .expect("libcore rlib in the sysroot");
    let tmp = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("core-objs");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let st = std::process::Command::new("ar")
        .current_dir(&tmp)
        .arg("x")
        .arg(&rlib)
        .status()
        .expect("run ar (binutils) to inspect libcore");
    assert!(st.success(), "ar x libcore failed");
    let mut syms = Vec::new();
    for obj in std::fs::read_dir(&tmp)
        .expect("tmp dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
    {
        if obj.extension().and_then(|e| e.to_str()) != Some("o") {
            continue;
        }
        let out = std::process::Command::new("readelf")
            .args(["-sW"])
            .arg(&obj)
            .output()
            .expect("run readelf (binutils) to inspect libcore");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[3] != "FUNC" || f[4] != "GLOBAL" || f[6] == "UND" {
                continue;
            }
            let name = f[7];
            let panicky = (name.contains("4core9panicking") && !name.ends_with("9panic_fmt"))
                || name.contains("unwrap_failed")
                || name.contains("expect_failed")
                || name.contains("index_fail")
                || name.contains("slice_error_fail")
                || name.contains("len_mismatch_fail")
                // core::fmt itself and core's Display impls (e.g. of Ipv4Addr, which smoltcp
                // references in messages of panics on invalid addresses): the kernel never
                // formats, and the precompiled code contains SSE.
                // (not `pad_integral` itself: the test looks for that name in the image)
                || (name.contains("4core3fmt") && !name.contains("pad_integral"))
                || (name.contains("4core3net") && name.contains("3fmt"));
            if panicky && !syms.iter().any(|s| s == name) {
                syms.push(name.to_string());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        !syms.is_empty(),
        "found no panic functions in libcore: cannot keep core::fmt out of the kernel"
    );
    syms
}

fn main() {
    rerun_if_changed(&["src", "kernel.ld", "user.ld", "build_support.rs"]);
    if is_nested_build() {
        return;
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("manifest");
    let mut flags: Vec<String> = [
        "-Crelocation-model=static",
        "-Ccode-model=kernel",
        // The kernel must never execute SSE: PVM cannot emulate it at CPL0 (PLATFORM.md).
        "-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
        "-Cno-redzone=yes",
        "-Cforce-frame-pointers=yes",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
        "-Clink-arg=-no-pie",
        "-Clink-arg=-Wl,--build-id=none",
        "-Clink-arg=-Wl,--gc-sections",
        "-Clink-arg=-Wl,-z,max-page-size=4096",
        &format!("-Clink-arg=-Wl,-T,{manifest}/kernel.ld"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in core_panic_symbols() {
        flags.push(format!("-Clink-arg=-Wl,--wrap={s}"));
        flags.push(format!(
            "-Clink-arg=-Wl,--defsym=__wrap_{s}=kscope_core_panic"
        ));
    }
    let bins = nested_build(
        "kscope-guest",
        &["kscope-kernel"],
        "kernel",
        &flags,
        "kernel",
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::copy(&bins[0], out.join("kscope-kernel.elf")).expect("copy kernel ELF");

    let names: Vec<&str> = PROGRAMS.iter().map(|(b, _)| *b).collect();
    let progs = nested_build(
        "kscope-guest",
        &names,
        "user",
        &user_rustflags(),
        "programs",
    );
    let mut table = String::from("&[\n");
    for ((bin, path), built) in PROGRAMS.iter().zip(&progs) {
        let dst = out.join(format!("{bin}.elf"));
        std::fs::copy(built, &dst).expect("copy program ELF");
        table.push_str(&format!(
            "    ({path:?}, include_bytes!({:?})),\n",
            dst.display().to_string()
        ));
    }
    table.push_str("]\n");
    std::fs::write(out.join("programs.rs"), table).expect("write programs.rs");
    println!("cargo::rustc-cfg=kscope_embed");
}
