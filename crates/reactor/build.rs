//! Declares the `loom` cfg so `--cfg loom` builds are lint-clean.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
