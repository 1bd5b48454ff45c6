//! The handler kinds `vmcall run --hypercall NR=KIND` and the control socket's `set NR=KIND`
//! accept, parsed in one place: [`HandlerSpec`]. A new kind is one more variant, one more arm
//! in [`HandlerSpec::from_str`] and in [`HandlerSpec::build`].

mod exec;

use std::sync::Arc;
use std::time::Duration;

use vmcall_vmm::hypercall::handlers::{parse_u64, Builtin, SpecError};
use vmcall_vmm::hypercall::HypercallHandler;

pub use exec::ExecHandler;

/// A parsed handler kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerSpec {
    /// `const:V`, `echo`, `add`, `log`, `errno:NAME`, `wasm:PATH`.
    Builtin(Builtin),
    /// `exec:CMD`: an external process answering one JSON line per call (docs/hypercalls.md).
    Exec(String),
}

/// Why a handler spec or an `NR=KIND` assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecParseError {
    /// `exec:` without a command.
    #[error("exec: needs a command, e.g. exec:python3 handler.py")]
    NoCommand,
    /// Not a handler kind (the text).
    #[error("unknown handler kind '{0}'; expected {KINDS}")]
    UnknownKind(String),
    /// The kind's own value was refused (a number, an error name, a module).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A standard KVM hypercall number given to `--hypercall`.
    #[error(
        "hypercall {nr} is {name}, a standard KVM hypercall: use --override {nr}={spec} to \
         replace it"
    )]
    Standard {
        /// The number.
        nr: u64,
        /// Linux's name for it.
        name: &'static str,
        /// The handler asked for.
        spec: HandlerSpec,
    },
}

/// What building a handler may depend on besides its spec.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Per-call deadline of `exec:` handlers.
    pub exec_deadline: Duration,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self { exec_deadline: exec::DEFAULT_DEADLINE }
    }
}

/// What every kind's syntax looks like, for error messages.
pub const KINDS: &str = "const:V, echo, add, log, errno:NAME, exec:CMD or wasm:PATH";

impl std::str::FromStr for HandlerSpec {
    type Err = SpecParseError;
    fn from_str(spec: &str) -> Result<Self, SpecParseError> {
        let spec = spec.trim();
        if let Some(cmd) = spec.strip_prefix("exec:") {
            let cmd = cmd.trim();
            if cmd.is_empty() {
                return Err(SpecParseError::NoCommand);
            }
            return Ok(HandlerSpec::Exec(cmd.to_string()));
        }
        spec.parse::<Builtin>().map(HandlerSpec::Builtin).map_err(|e| match e {
            SpecError::UnknownKind(k) => SpecParseError::UnknownKind(k),
            other => SpecParseError::Spec(other),
        })
    }
}

impl std::fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerSpec::Builtin(b) => b.fmt(f),
            HandlerSpec::Exec(cmd) => write!(f, "exec:{cmd}"),
        }
    }
}

impl HandlerSpec {
    /// The handler this spec describes, ready for the table (an `exec:` process starts on its
    /// first call).
    pub fn build(&self, nr: u64, opts: &BuildOptions) -> Arc<dyn HypercallHandler> {
        match self {
            HandlerSpec::Builtin(b) => Arc::new(b.clone()),
            HandlerSpec::Exec(cmd) => Arc::new(ExecHandler::new(nr, cmd, opts.exec_deadline)),
        }
    }
}

/// Parse `NR=KIND` (as given to `--hypercall`, `--override` and the control socket's `set`).
pub fn parse_assignment(s: &str) -> Result<(u64, HandlerSpec), SpecParseError> {
    let (nr, spec) = s.split_once('=').ok_or(SpecError::BadAssignment)?;
    Ok((parse_u64(nr.trim())?, spec.parse()?))
}

/// Parse `NR=KIND` for `--hypercall`: NR must not be a standard KVM hypercall, whose
/// behaviour only `--override` may replace.
pub fn parse_custom_assignment(s: &str) -> Result<(u64, HandlerSpec), SpecParseError> {
    let (nr, spec) = parse_assignment(s)?;
    if vmcall_vmm::hypercall::table::is_standard(nr) {
        let name = vmcall_abi::hc::name(nr).unwrap_or("?");
        return Err(SpecParseError::Standard { nr, name, spec });
    }
    Ok((nr, spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!("const:2".parse(), Ok(HandlerSpec::Builtin(Builtin::Const(2))));
        assert_eq!(
            parse_assignment("20=exec:python3 h.py --x=1"),
            Ok((20, HandlerSpec::Exec("python3 h.py --x=1".into())))
        );
        assert_eq!(HandlerSpec::Exec("cat".into()).to_string(), "exec:cat");
        assert!("exec:  "
            .parse::<HandlerSpec>()
            .unwrap_err()
            .to_string()
            .contains("needs a command"));
        let e = "wasm2:x".parse::<HandlerSpec>().unwrap_err().to_string();
        assert!(e.contains("unknown handler kind 'wasm2:x'") && e.contains("exec:CMD"), "{e}");
        assert!(parse_assignment("x=echo").unwrap_err().to_string().contains("not a number"));
        assert!(parse_assignment("20").unwrap_err().to_string().contains("NR=HANDLER"));
        let e = parse_custom_assignment("1=const:5").unwrap_err().to_string();
        assert!(e.contains("KVM_HC_VAPIC_POLL_IRQ") && e.contains("--override 1=const:5"), "{e}");
        assert!(parse_custom_assignment("20=echo").is_ok());
        let h = HandlerSpec::Builtin(Builtin::Echo).build(20, &BuildOptions::default());
        assert_eq!(h.kind(), "echo");
    }
}
