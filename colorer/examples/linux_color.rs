//! Color a Linux memory image (ELF core with VMCOREINFO) and, given its ground truth, print
//! the accuracy: `cargo run --release -p kscope-colorer --example linux_color -- IMAGE [TRUTH]`.
//! `kscope color --image` is the full command; this example has no other dependency.

use kscope_colorer::linux::truth::{compare, Truth};
use kscope_colorer::linux::LinuxImage;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let image = args.first().ok_or("usage: linux_color IMAGE [TRUTH]")?;
    let t = Instant::now();
    let img = LinuxImage::open(image.as_ref())?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let map = img.color()?;
    let color_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("{:#?}", img.profile.layout);
    println!(
        "open {open_ms:.1} ms, color {color_ms:.1} ms, {} roots, {} files",
        img.profile.processes_len(),
        map.stats.files
    );
    println!("{}", serde_json::to_string_pretty(&map.stats)?);
    if let Some(tp) = args.get(1) {
        let truth = Truth::open(tp.as_ref())?;
        let a = compare(&truth, &map)?;
        println!("{}", serde_json::to_string_pretty(&a)?);
    }
    Ok(())
}
