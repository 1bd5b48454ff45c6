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

/// What the command reports as an error (exit status 125): its one error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operation on a file, a socket or the system failed: what, and the OS's reason.
    #[error("{what}")]
    Io {
        /// What failed, e.g. "cannot read guest 'x.elf'".
        what: String,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// Something vmcall will not use or do: an empty or oversized guest file, a path that is
    /// not a socket, a directory that is not private. The text says what and why.
    #[error("{0}")]
    Refused(String),
    /// No backend can run the guest as asked (the text says why).
    #[error("{0}")]
    Backend(String),
    /// A handler could not be installed.
    #[error("{what}")]
    Table {
        /// The option that asked for it, e.g. "--hypercall 20=echo".
        what: String,
        /// Why the table refused it.
        #[source]
        source: vmcall_vmm::hypercall::TableError,
    },
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] vmcall_vmm::vm::BuildError),
    /// The run ended with an error.
    #[error(transparent)]
    Run(#[from] vmcall_vmm::vm::RunError),
    /// `vmcall bench` failed (its text says how).
    #[error("{0}")]
    Bench(String),
    /// A recording could not be written, read or replayed (`--record`, `vmcall replay`,
    /// `vmcall stats`; the text says what).
    #[error("{0}")]
    Record(String),
    /// The guest faulted: the run's error with the symbol at RIP and the vCPU's last
    /// hypercalls (`fault.rs`), already composed.
    #[error("{0}")]
    GuestFault(String),
}

impl Error {
    /// An [`Error::Io`]: `what` failed because of `source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
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
