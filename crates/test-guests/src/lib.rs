//! Paths of the guests in `guests/`, built for bare metal by this crate's build script.
#![forbid(unsafe_code)]

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The demo guest's image, embedded so that `vmcall demo` works from any directory.
pub static DEMO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rust/release/demo"));

/// The loop guest's image (hypercall 20 forever, each new answer printed), embedded for
/// `vmcall demo --loop`.
pub static HCLOOP_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rust/release/hcloop"));

/// The benchmark guest's image, embedded for `vmcall bench`.
pub static BENCH_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rust/release/bench"));

/// The density guest's image (one of many small VMs: parks in a hypercall, then checks the
/// answers of a run of calls), embedded for `vmcall bench --density`.
pub static DENSITY_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rust/release/density"));

/// The path of the guest called `name`.
pub fn path(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
}
