//! Publishes this package's directory to the build scripts of its dependents
//! (`DEP_VMCALL_GUEST_ROOT`): they build bare-metal guests from these sources and `link.ld`.
fn main() {
    println!("cargo:root={}", std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=build.rs");
}
