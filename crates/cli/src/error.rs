//! How the command talks on stderr: the one printer of an error and its causes, and notes
//! that `-q` silences.

use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: from now on, print no notes (warnings and errors still print).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `-q` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A note on stderr about what vmcall does (the backend it picked, the control socket, ...),
/// unless `-q` was given. Same arguments as `eprintln!`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if !$crate::error::quiet() {
            eprintln!($($arg)*)
        }
    };
}

/// An error and each of its causes, on one line: `error: cause: cause`. The command's one
/// way of showing an error chain, in error messages and in `vmcall info` alike.
pub fn chain(e: &(dyn std::error::Error + '_)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors already show their cause in their own message.
        if !s.ends_with(&text) {
            s += ": ";
            s += &text;
        }
        source = cause.source();
    }
    s
}

/// Print `err` as vmcall's error report: `vmcall: error: ...` and its causes.
pub fn report(err: &(dyn std::error::Error + '_)) {
    eprintln!("vmcall: error: {}", chain(err));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn chains_causes_on_one_line_without_repeating_them() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(chain(&Outer(io())), "outer: disk on fire");
        assert_eq!(chain(&Repeats(io())), "outer: disk on fire");
    }
}
