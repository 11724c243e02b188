//! Time coloring of synthetic kscope guests: `color_cost [MiB...]` (default 256 1024 2048).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![256, 1024, 2048]
    } else {
        sizes
    };
    for mib in sizes {
        let r = kscope_colorer::cost::measure_synthetic(mib << 20, 5)?;
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
