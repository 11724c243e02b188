// Shared by the build scripts of `kscope-guest` and `kscope-workloads` (via `include!`):
// builds freestanding guest binaries (the kernel, user programs) with a nested cargo
// invocation, so that `cargo build` of the workspace produces everything kscope embeds.
//
// The nested build uses its own target directory (no lock contention with the outer build),
// an explicit `--target` (so the freestanding RUSTFLAGS never reach build scripts), the
// `guest` profile (panic=abort) and sets KSCOPE_NESTED=1 so that build scripts of the nested
// packages do not recurse.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// True inside a nested guest build: the build script must do nothing.
fn is_nested_build() -> bool {
    std::env::var_os("KSCOPE_NESTED").is_some()
}

/// Build `bins` of `package` with `features` and `rustflags`; returns the path of each binary.
#[allow(dead_code)]
fn nested_build(
    package: &str,
    bins: &[&str],
    features: &str,
    rustflags: &[String],
    subdir: &str,
) -> Vec<PathBuf> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // OUT_DIR = <target>/<profile>/build/<pkg>-<hash>/out: keep nested artifacts next to the
    // outer ones so that they are cached across builds.
    let target_root = out_dir
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.clone());
    let target_dir = target_root.join("kscope-nested").join(subdir);
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest"));
    let workspace = manifest_dir.parent().expect("workspace root").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .arg("build")
        .arg("--offline")
        .args(["--profile", "guest", "--target", GUEST_TRIPLE, "-p", package])
        .arg("--target-dir")
        .arg(&target_dir);
    for b in bins {
        cmd.args(["--bin", b]);
    }
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_PANIC",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        .env("KSCOPE_NESTED", "1");
    let status = cmd.status().expect("failed to run the nested cargo build of the guest");
    assert!(status.success(), "nested guest build of {package} failed ({status})");
    bins.iter()
        .map(|b| target_dir.join(GUEST_TRIPLE).join("guest").join(b))
        .collect()
}

/// Ask cargo to re-run the build script when anything under `paths` changes.
fn rerun_if_changed(paths: &[&str]) {
    for p in paths {
        println!("cargo::rerun-if-changed={p}");
    }
    println!("cargo::rerun-if-env-changed=KSCOPE_NESTED");
}

/// RUSTFLAGS for guest user programs (ring 3): static, linked at 4 MiB by `guest/user.ld`,
/// SSE allowed (user mode may use it, PLATFORM.md).
#[allow(dead_code)] // each build script uses a subset
fn user_rustflags() -> Vec<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("manifest");
    let guest_dir = std::path::Path::new(&manifest)
        .parent()
        .expect("workspace root")
        .join("guest");
    [
        "-Crelocation-model=static".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-no-pie".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        "-Clink-arg=-Wl,-z,max-page-size=4096".to_string(),
        format!("-Clink-arg=-Wl,-T,{}/user.ld", guest_dir.display()),
    ]
    .to_vec()
}
