//! Snapshot verification under real KVM (issue 10): guest memory is checked page by page on
//! restore (lazily on first fetch), every state field is validated before anything is
//! created, KVM refusing a state says so, leftovers of killed writers are removed, and a
//! bounded fuzz run over mutated state files never panics, hangs or restores garbage
//! silently.

#[path = "clone_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kscope_guest::abi::layout::KERNEL_VIRT_BASE;
use kscope_guest::abi::request::kind;
use kscope_vmm::snapfile::{self, SnapshotPaths};
use kscope_vmm::{MemoryMode, Vm, VmError, VmState};
use serde_json::Value;
use support::{ask, boot};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kscope-snapverify-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn payload(dir: &Path) -> Value {
    let st = snapfile::read_state(&SnapshotPaths::in_dir(dir).state).unwrap();
    serde_json::from_slice(&st.payload).unwrap()
}

fn set_payload(dir: &Path, v: &Value) {
    let path = SnapshotPaths::in_dir(dir).state;
    snapfile::rewrite_payload(&path, &serde_json::to_vec(v).unwrap()).unwrap();
}

fn flip_page(dir: &Path, gfn: u64, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(SnapshotPaths::in_dir(dir).memory)
        .unwrap();
    let off = gfn * 4096 + at;
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], off).unwrap();
}

fn wait_failed(vm: &Vm) -> String {
    let t0 = Instant::now();
    loop {
        if let VmState::Failed(why) = vm.state() {
            return why;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "VM still {:?}",
            vm.state()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_corrupt_page_fails_its_vm_lazily_and_the_restore_eagerly() {
    let vm = boot("v-src", 64 << 20);
    let dir = scratch("page");
    // Stale leftovers of a writer killed mid-write: removed by the next snapshot.
    std::fs::create_dir_all(&dir).unwrap();
    for n in [".memory.kmem.tmp-999999999-0", ".kernel.elf.tmp"] {
        std::fs::write(dir.join(n), b"partial").unwrap();
    }
    let rep = vm.snapshot(&dir).expect("snapshot");
    drop(vm);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk.img", "kernel.elf", "memory.kmem", "state.ksnap"]
    );

    // Pristine: both modes restore and answer.
    for mode in [MemoryMode::Lazy, MemoryMode::Eager] {
        let r = Vm::restore(&dir, mode, "v-ok").expect("restore");
        assert_eq!(ask(&r, "echo fine"), "fine");
    }

    // A page nobody touches turns to data: a lazy restore stays lazy and never reads it; an
    // eager restore reads everything and refuses.
    let last = rep.memory.pages - 1;
    flip_page(&dir, last, 100);
    let r = Vm::restore(&dir, MemoryMode::Lazy, "v-lazy-untouched").expect("lazy restore");
    assert_eq!(ask(&r, "echo lazy"), "lazy");
    let st = r.memory_stats();
    assert!(st.pages_fetched < rep.memory.data_pages, "{st:?}");
    drop(r);
    let e = Vm::restore(&dir, MemoryMode::Eager, "v-eager").unwrap_err();
    assert!(
        matches!(&e, VmError::SnapshotCorrupt { path, what } if path.ends_with("memory.kmem") && what.contains(&format!("page {last}"))),
        "{e}"
    );
    flip_page(&dir, last, 100);

    // The page holding vCPU 0's next instruction: the lazy VM fails on its first fetch, with
    // an error naming the memory file, and never runs with the wrong bytes.
    let p = payload(&dir);
    let rip = p["machine"]["vcpus"][0]["regs"]["rip"].as_u64().unwrap();
    let gfn = (rip - KERNEL_VIRT_BASE) / 4096;
    flip_page(&dir, gfn, rip % 4096);
    let t0 = Instant::now();
    let r =
        Vm::restore(&dir, MemoryMode::Lazy, "v-lazy-bad").expect("a lazy restore reads no page");
    let why = wait_failed(&r);
    assert!(
        why.contains("memory.kmem")
            && why.contains(&format!("guest page {gfn}"))
            && why.contains("corrupt"),
        "{why}"
    );
    let e = r
        .request(kind::WORKLOAD, b"echo never", Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(e, VmError::SnapshotCorrupt { .. }), "{e}");
    r.stop().expect("stop");
    assert!(t0.elapsed() < Duration::from_secs(10));
    drop(r);
    let e = Vm::restore(&dir, MemoryMode::Eager, "v-eager-bad").unwrap_err();
    assert!(matches!(e, VmError::SnapshotCorrupt { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Offset of CR3 in `kvm_sregs` (the KVM backend's part of a saved vCPU, stored as bytes).
const CR3: usize = 240;

fn with_u64(bytes: &Value, at: usize, val: u64) -> Value {
    let mut a = bytes.as_array().unwrap().clone();
    for (i, b) in val.to_le_bytes().into_iter().enumerate() {
        a[at + i] = b.into();
    }
    Value::Array(a)
}

fn filled(bytes: &Value, byte: u8) -> Value {
    Value::Array(vec![byte.into(); bytes.as_array().unwrap().len()])
}

/// The neutral general registers `regs` with every field set to `val`.
fn all_regs(regs: &Value, val: u64) -> Value {
    let mut r = regs.clone();
    for (_, x) in r.as_object_mut().unwrap().iter_mut() {
        *x = val.into();
    }
    r
}

/// Sets `path` (slash-separated keys and indices) in `v`.
fn set(v: &mut Value, path: &str, new: Value) {
    let mut at = v;
    for k in path.split('/') {
        at = match k.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[k],
        };
    }
    *at = new;
}

#[test]
fn inconsistent_state_fields_are_refused_before_anything_runs() {
    let vm = boot("v-fields", 64 << 20);
    let dir = scratch("fields");
    vm.snapshot(&dir).expect("snapshot");
    drop(vm);
    let good = payload(&dir);
    let regs = good["machine"]["vcpus"][0]["regs"].clone();
    let arch = "machine/vcpus/0/arch/Kvm";
    let sregs = good["machine"]["vcpus"][0]["arch"]["Kvm"]["sregs"].clone();
    let (sr, ev, xs, ms) = (
        format!("{arch}/sregs"),
        format!("{arch}/events"),
        format!("{arch}/xsave"),
        format!("{arch}/mp_state"),
    );
    let mp = |v: u8| Value::Array(vec![v.into(), 0.into(), 0.into(), 0.into()]);
    let q = "machine/devices/request/queues/0";
    let (qd, qu, qs) = (
        format!("{q}/desc_table"),
        format!("{q}/used_ring"),
        format!("{q}/size"),
    );
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "all-zero registers",
            "machine/vcpus/0/regs",
            all_regs(&regs, 0),
            "rflags",
        ),
        (
            "all-ones registers",
            "machine/vcpus/0/regs",
            all_regs(&regs, u64::MAX),
            "rflags",
        ),
        ("empty sregs", &sr, filled(&sregs, 0), "cr0"),
        (
            "non-canonical RIP",
            "machine/vcpus/0/regs/rip",
            (1u64 << 60).into(),
            "rip",
        ),
        (
            "CR3 outside RAM",
            &sr,
            with_u64(&sregs, CR3, 1 << 40),
            "cr3",
        ),
        (
            "registers missing",
            "machine/vcpus/0/regs",
            serde_json::json!({"rip": 0}),
            "missing field",
        ),
        (
            "short events array",
            &ev,
            Value::Array(vec![1.into(); 10]),
            "events is 10 bytes",
        ),
        (
            "long sregs array",
            &sr,
            Value::Array(vec![1.into(); 400]),
            "sregs is 400 bytes",
        ),
        (
            "empty MSR entry",
            "machine/vcpus/0/msrs/0",
            Value::Array(vec![]),
            "state payload",
        ),
        (
            "unknown backend",
            "machine/vcpus/0/arch",
            serde_json::json!({"Xen": {}}),
            "unknown backend",
        ),
        (
            "short XSAVE area",
            &xs,
            Value::Array(vec![0.into(); 10]),
            "xsave",
        ),
        ("no vCPUs", "machine/vcpus", Value::Array(vec![]), "vCPU"),
        (
            "queue at 2^60",
            &qd,
            (1u64 << 60).into(),
            "descriptor table",
        ),
        ("used ring past RAM", &qu, (64u64 << 20).into(), "used ring"),
        ("queue size 3", &qs, 3.into(), "power of two"),
        (
            "one queue missing",
            "machine/devices/request/queues/1",
            Value::Null,
            "request device",
        ),
        ("mp_state", &ms, mp(7), "mp_state"),
        (
            "device status",
            "machine/devices/block/status",
            0xffff.into(),
            "status",
        ),
    ];
    for (what, path, new, expect) in cases {
        let mut p = good.clone();
        if new.is_null() {
            p["machine"]["devices"]["request"]["queues"]
                .as_array_mut()
                .unwrap()
                .pop();
        } else {
            set(&mut p, path, new);
        }
        set_payload(&dir, &p);
        let t0 = Instant::now();
        let e = Vm::restore(&dir, MemoryMode::Lazy, "v-f").expect_err(what);
        assert!(
            matches!(&e, VmError::SnapshotCorrupt { what: w, .. } if w.contains(expect)),
            "{what}: {e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}");
    }
    // KVM refuses a state the checks let through (vCPU 0 in INIT_RECEIVED): the error says the
    // saved state was rejected and which part, not "check /dev/kvm".
    let mut p = good.clone();
    set(&mut p, &ms, mp(2));
    set_payload(&dir, &p);
    let e = Vm::restore(&dir, MemoryMode::Lazy, "v-f").unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            VmError::StateRejected {
                op: "KVM_SET_MP_STATE",
                ..
            }
        ) && msg.contains("rejected the saved vCPU 0 state")
            && msg.contains("mp_state")
            && !msg.contains("/dev/kvm"),
        "{msg}"
    );
    set_payload(&dir, &good);
    let r = Vm::restore(&dir, MemoryMode::Lazy, "v-good").unwrap();
    assert_eq!(ask(&r, "echo good"), "good");
    drop(r);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// xorshift64*: a seeded, dependency-free generator for the fuzz run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Every leaf and container of `v` as a path of keys/indices.
fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(i.to_string());
                paths(x, at, out);
                at.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                at.push(k.clone());
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(v, |at, k| match at {
        Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
        other => &mut other[k.as_str()],
    })
}

/// One structure-aware mutation: a field set to 0, all ones, 2^60, a random value or a
/// flipped bit; an array emptied, shortened or lengthened; an object emptied or a key
/// removed; a value replaced by one of another type.
fn mutate(v: &mut Value, rng: &mut Rng) -> String {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = all[rng.below(all.len())].clone();
    let n = node(v, &path);
    let how = rng.below(10);
    match (how, &mut *n) {
        (0, _) => *n = 0.into(),
        (1, _) => *n = u64::MAX.into(),
        (2, _) => *n = (1u64 << 60).into(),
        (3, _) => *n = rng.next().into(),
        (4, Value::Number(x)) => {
            let bit = rng.below(64);
            *n = (x.as_u64().unwrap_or(0) ^ (1 << bit)).into();
        }
        (5, Value::Array(a)) => a.clear(),
        (6, Value::Array(a)) if !a.is_empty() => {
            a.pop();
        }
        (7, Value::Array(a)) if !a.is_empty() => {
            let x = a[0].clone();
            a.push(x);
        }
        (8, Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(rng.below(o.len())).unwrap().clone();
            o.remove(&k);
        }
        (_, _) => *n = Value::String("x".into()),
    }
    format!("{}: mutation {how}", path.join("/"))
}

/// Random and structure-aware mutations of a valid state file for a bounded time
/// (`KSCOPE_FUZZ_SECS`, default 10 s; seed `KSCOPE_FUZZ_SEED`). Each mutated snapshot is
/// restored for real: it must be refused with a snapshot error, or restore to a VM that
/// answers or fails cleanly and stops promptly. Never a panic, never a hang.
#[test]
fn fuzzed_state_files_are_refused_or_restore_cleanly() {
    let secs: u64 = std::env::var("KSCOPE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("KSCOPE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b73_636f_7065);
    let vm = boot("v-fuzz", 64 << 20);
    let dir = scratch("fuzz");
    vm.snapshot(&dir).expect("snapshot");
    drop(vm);
    let paths_ = SnapshotPaths::in_dir(&dir);
    let good_file = std::fs::read(&paths_.state).unwrap();
    let good = payload(&dir);
    let mut rng = Rng(seed | 1);
    let t0 = Instant::now();
    let (mut runs, mut refused, mut restored) = (0u32, 0u32, 0u32);
    while t0.elapsed() < Duration::from_secs(secs) {
        runs += 1;
        let what = match rng.below(4) {
            // Raw bytes flipped anywhere in the file: the checksum must catch them.
            0 => {
                let mut b = good_file.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                std::fs::write(&paths_.state, &b).unwrap();
                "raw bytes".to_string()
            }
            // Bytes flipped inside the JSON payload, checksum recomputed.
            1 => {
                let mut b = serde_json::to_vec(&good).unwrap();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                std::fs::write(&paths_.state, &good_file).unwrap();
                snapfile::rewrite_payload(&paths_.state, &b).unwrap();
                "payload bytes".to_string()
            }
            // Structure-aware mutations, checksum recomputed.
            _ => {
                let mut p = good.clone();
                let mut what = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    what.push(mutate(&mut p, &mut rng));
                }
                std::fs::write(&paths_.state, &good_file).unwrap();
                set_payload(&dir, &p);
                what.join(", ")
            }
        };
        let t = Instant::now();
        match Vm::restore(&dir, MemoryMode::Lazy, "v-fz") {
            Err(
                VmError::SnapshotCorrupt { .. }
                | VmError::SnapshotIncompatible { .. }
                | VmError::StateRejected { .. }
                | VmError::BadConfig(_),
            ) => refused += 1,
            Err(e) => panic!("{what}: unexpected error kind: {e}"),
            Ok(r) => {
                // A value the checks cannot judge (e.g. a general register): the VM must
                // answer or fail on its own, and stop promptly.
                restored += 1;
                let _ = r.request(kind::WORKLOAD, b"echo fz", Duration::from_secs(2));
                let ts = Instant::now();
                r.stop().expect("stop");
                assert!(ts.elapsed() < Duration::from_secs(5), "{what}: slow stop");
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what}: took {:?}",
            t.elapsed()
        );
    }
    println!("fuzz: {runs} runs in {secs} s (seed {seed}): {refused} refused, {restored} restored");
    assert!(runs >= 10 && refused > 0, "{runs} runs, {refused} refused");
    std::fs::remove_dir_all(&dir).unwrap();
}
