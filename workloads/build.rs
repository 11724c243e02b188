//! Builds the guest programs (`src/bin/*`, feature `guest-bins`) with the nested freestanding
//! build and copies them into OUT_DIR, where `src/lib.rs` embeds them as `PROGRAMS`.

include!("../guest/build_support.rs");

/// The guest programs (also the names under `/bin` in the image).
const BINS: [&str; 6] = ["web", "olap", "json", "aes", "matmul", "compress"];

fn main() {
    rerun_if_changed(&[
        "src",
        "build.rs",
        "../guest/src/ulib",
        "../guest/src/abi",
        "../guest/user.ld",
        "../guest/build_support.rs",
        "../guest-agent/src",
    ]);
    if is_nested_build() {
        return;
    }
    let built = nested_build(
        "kscope-workloads",
        &BINS,
        "guest-bins",
        &user_rustflags(),
        "workloads",
    );
    // The guest agent (crate `kscope-guest-agent`) goes into every image as `/bin/agent`.
    let agent = nested_build(
        "kscope-guest-agent",
        &["agent"],
        "guest-bin",
        &user_rustflags(),
        "agent",
    );
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::copy(&agent[0], out.join("agent")).expect("copy the guest agent");
    for (name, path) in BINS.iter().zip(&built) {
        std::fs::copy(path, out.join(name))
            .unwrap_or_else(|e| panic!("copy guest program {} from {}: {e}", name, path.display()));
    }
    println!("cargo::rustc-cfg=kscope_embed");
}
