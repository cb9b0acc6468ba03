//! Link arguments for the bare-metal image (see ../../../shared/docs/platform-notes.md: they must
//! not go into RUSTFLAGS, which would also hit build scripts and proc macros on this host target).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,--gc-sections",
        &format!("-Wl,-T{dir}/link.ld"),
        "-Wl,-Tdefmt.x",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
