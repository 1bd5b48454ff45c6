//! Paths of the guests in `guests/`, built for bare metal by this crate's build script.
#![forbid(unsafe_code)]

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The path of the guest called `name`.
pub fn path(name: &str) -> Option<&'static str> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
}
