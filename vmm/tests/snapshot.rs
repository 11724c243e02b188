//! Snapshots under real KVM with the real kscope kernel: round trip (lazy and eager), restore
//! in a state that answers the same, clone of a restored VM, damaged snapshots rejected.

#[path = "clone_support/mod.rs"]
mod support;

use std::path::PathBuf;

use kscope_vmm::{CloneOptions, MemoryMode, Vm, VmError};
use support::{ask, ask_bytes, boot};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kscope-snaptest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn snapshot_round_trip_lazy_and_eager() {
    let vm = boot("s-src", 64 << 20);
    // Some state the restored VM must reproduce: a file read through the page cache and the
    // process id.
    let ls = ask_bytes(&vm, "ls");
    let pid = ask(&vm, "pid");
    let dir = scratch("rt");
    let rep = vm.snapshot(&dir).expect("snapshot");
    println!(
        "snapshot: pause {:?}, total {:?}, {} data pages of {}",
        rep.pause, rep.total, rep.memory.data_pages, rep.memory.pages
    );
    assert!(rep.memory.data_pages > 0 && rep.memory.data_pages < rep.memory.pages);
    // The source keeps running, unaffected.
    assert_eq!(ask(&vm, "echo src"), "src");
    drop(vm);
    for mode in [MemoryMode::Lazy, MemoryMode::Eager] {
        let r = Vm::restore(&dir, mode, &format!("s-{mode:?}")).expect("restore");
        assert_eq!(ask(&r, "echo restored"), "restored", "{mode:?}");
        assert_eq!(ask_bytes(&r, "ls"), ls);
        assert_eq!(ask(&r, "pid"), pid);
        assert_eq!(ask(&r, "sigclone"), "0 0", "a restored VM is not a clone");
        let st = r.memory_stats();
        println!("{mode:?} restore: {st:?}");
        assert_eq!(st.lazy, mode == MemoryMode::Lazy);
        // A restored VM can be cloned like any parent.
        let batch = r
            .clone_children(2, &CloneOptions::default())
            .expect("clone");
        for c in &batch.children {
            assert_eq!(ask(c, "echo clone-of-restored"), "clone-of-restored");
            assert_eq!(ask(c, "sigclone").split(' ').next(), Some("1"));
        }
        assert_eq!(ask(&r, "echo parent"), "parent");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn flip(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn damaged_snapshots_are_rejected() {
    let vm = boot("s-bad", 64 << 20);
    let dir = scratch("bad");
    vm.snapshot(&dir).expect("snapshot");
    drop(vm);
    let state = dir.join("state.ksnap");
    let good = std::fs::read(&state).unwrap();
    let restore = || Vm::restore(&dir, MemoryMode::Lazy, "s-bad-r");

    // A flipped payload byte: checksum error.
    flip(&state, good.len() - 10);
    let e = restore().unwrap_err();
    assert!(
        matches!(&e, VmError::SnapshotCorrupt { what, .. } if what.contains("CRC")),
        "{e}"
    );
    // Another format version.
    let mut v = good.clone();
    v[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&state, &v).unwrap();
    let e = restore().unwrap_err();
    assert!(matches!(e, VmError::SnapshotIncompatible { .. }), "{e}");
    // Bad magic.
    let mut m = good.clone();
    m[0] = b'X';
    std::fs::write(&state, &m).unwrap();
    assert!(matches!(
        restore().unwrap_err(),
        VmError::SnapshotCorrupt { .. }
    ));
    // Truncated state file.
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    assert!(matches!(
        restore().unwrap_err(),
        VmError::SnapshotCorrupt { .. }
    ));
    std::fs::write(&state, &good).unwrap();
    // A damaged disk image.
    flip(&dir.join("disk.img"), 100);
    let e = restore().unwrap_err();
    assert!(
        matches!(&e, VmError::SnapshotCorrupt { path, .. } if path.ends_with("disk.img")),
        "{e}"
    );
    flip(&dir.join("disk.img"), 100);
    // A memory file of the wrong size.
    let mem = dir.join("memory.kmem");
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 4096).unwrap();
    assert!(matches!(
        restore().unwrap_err(),
        VmError::SnapshotCorrupt { .. }
    ));
    f.set_len(len).unwrap();
    // Missing file: the snapshot is incomplete, and the error says which file.
    std::fs::remove_file(dir.join("kernel.elf")).unwrap();
    let e = restore().unwrap_err();
    assert!(
        matches!(&e, VmError::SnapshotCorrupt { what, .. } if what.contains("kernel.elf")),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
