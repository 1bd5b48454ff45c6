// Link every guest as a static, non-PIE ELF at the address the SDK's linker script names.
fn main() {
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/guest/link.ld");
    println!("cargo:rerun-if-changed={}", sdk.display());
    for arg in ["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-n"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", sdk.display());
}
