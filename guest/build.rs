//! Builds the guest kernel (`src/kernel/`) as a freestanding ELF and embeds it.

include!("build_support.rs");

fn main() {
    rerun_if_changed(&["src", "kernel.ld", "build_support.rs"]);
    if is_nested_build() {
        return;
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("manifest");
    let flags: Vec<String> = [
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
        "-Clink-arg=-Wl,-z,max-page-size=4096",
        &format!("-Clink-arg=-Wl,-T,{manifest}/kernel.ld"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let bins = nested_build("kscope-guest", &["kscope-kernel"], "kernel", &flags, "kernel");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::copy(&bins[0], out.join("kscope-kernel.elf")).expect("copy kernel ELF");
    println!("cargo::rustc-cfg=kscope_embed");
}
