//! Publishes this package's directory to the build scripts of its dependents
//! (`DEP_VMCALL_ABI_ROOT`): the `vmcall` command builds its built-in guests against these sources.
fn main() {
    println!("cargo:root={}", std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=build.rs");
}
