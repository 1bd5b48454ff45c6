//! The built-in guests, built for bare metal from `guests/` by the build script and embedded,
//! so that `vmcall demo` and `vmcall bench` work from any directory.

/// The demo guest: a few standard hypercalls and the custom hypercall 20.
pub static DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/target/release/demo"));

/// The loop guest of `vmcall demo --loop`: hypercall 20 forever, each new answer printed.
pub static HCLOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/target/release/hcloop"));

/// The benchmark guest of `vmcall bench`.
pub static BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/target/release/bench"));

/// The density guest of `vmcall bench --density` (one of many small VMs: parks in a hypercall,
/// then checks the answers of a run of calls).
pub static DENSITY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/target/release/density"));
