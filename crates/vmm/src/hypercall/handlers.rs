//! Built-in handler kinds, so people can experiment without writing Rust:
//! `const:V`, `echo`, `add`, `log`, `errno:NAME`, and `wasm:PATH` (a WebAssembly module,
//! feature `wasm`).

use super::call::{Call, HypercallError, HypercallHandler, HypercallResult};

/// A parsed built-in handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builtin {
    /// Return V.
    Const(u64),
    /// Return a0.
    Echo,
    /// Return a0 + a1 + a2 + a3 (wrapping).
    Add,
    /// Print the call to stderr and return 0.
    Log,
    /// Return `-KVM_<NAME>`.
    Errno(&'static str, i64),
    /// Run a WebAssembly module (`wasm:PATH`), loaded and instantiated when the spec is parsed.
    Wasm(WasmSpec),
}

/// A `wasm:PATH` handler: the path as given, and the instance loaded from it. Each parse loads
/// its own instance; clones share it. Equal only to itself (or a clone).
#[derive(Debug, Clone)]
pub struct WasmSpec {
    /// The module's path, as given.
    pub path: String,
    /// The loaded module.
    #[cfg(feature = "wasm")]
    pub handler: std::sync::Arc<super::wasm::WasmHandler>,
}

impl PartialEq for WasmSpec {
    fn eq(&self, other: &Self) -> bool {
        #[cfg(feature = "wasm")]
        return std::sync::Arc::ptr_eq(&self.handler, &other.handler);
        #[cfg(not(feature = "wasm"))]
        return self.path == other.path;
    }
}
impl Eq for WasmSpec {}

#[cfg(feature = "wasm")]
fn load_wasm(path: &str) -> Result<Builtin, SpecError> {
    let handler = super::wasm::WasmHandler::load(path).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(cause) = src {
            msg += &format!(": {cause}");
            src = cause.source();
        }
        SpecError::Wasm(msg)
    })?;
    Ok(Builtin::Wasm(WasmSpec { path: path.to_string(), handler: std::sync::Arc::new(handler) }))
}

#[cfg(not(feature = "wasm"))]
fn load_wasm(_: &str) -> Result<Builtin, SpecError> {
    Err(SpecError::Wasm("this vmcall was built without the `wasm` feature".into()))
}

/// Why a handler spec did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not a handler kind (the text).
    #[error(
        "unknown handler kind '{0}'; expected const:V, echo, add, log, errno:NAME or wasm:PATH"
    )]
    UnknownKind(String),
    /// Not a number (the text).
    #[error("'{0}' is not a number (decimal, 0x hex, or negative decimal)")]
    BadNumber(String),
    /// Not an error name (the text).
    #[error("unknown error name '{0}'; expected one of {names}", names = error_names())]
    BadErrno(String),
    /// Not of the form NR=HANDLER.
    #[error("expected NR=HANDLER, e.g. 20=const:42")]
    BadAssignment,
    /// A `wasm:` module could not be loaded (why).
    #[error("{0}")]
    Wasm(String),
}

fn error_names() -> String {
    vmcall_abi::errno::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Parse a number: decimal, `0x` hex, or a negative decimal (two's complement).
pub fn parse_u64(s: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::BadNumber(s.to_string());
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(&hex.replace('_', ""), 16).map_err(|_| bad())
    } else if s.starts_with('-') {
        s.parse::<i64>().map(|v| v as u64).map_err(|_| bad())
    } else {
        s.replace('_', "").parse::<u64>().map_err(|_| bad())
    }
}

impl std::str::FromStr for Builtin {
    type Err = SpecError;
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let (kind, arg) = spec.split_once(':').map_or((spec, None), |(k, a)| (k, Some(a)));
        match (kind, arg) {
            ("const", Some(v)) => Ok(Builtin::Const(parse_u64(v)?)),
            ("echo", None) => Ok(Builtin::Echo),
            ("add", None) => Ok(Builtin::Add),
            ("log", None) => Ok(Builtin::Log),
            ("wasm", Some(path)) if !path.is_empty() => load_wasm(path),
            ("errno", Some(name)) => {
                let upper = name.to_ascii_uppercase();
                let upper = upper.strip_prefix("KVM_").unwrap_or(&upper);
                vmcall_abi::errno::ALL
                    .iter()
                    .find(|(n, _)| *n == upper)
                    .map(|(n, v)| Builtin::Errno(n, *v))
                    .ok_or_else(|| SpecError::BadErrno(name.to_string()))
            }
            _ => Err(SpecError::UnknownKind(spec.to_string())),
        }
    }
}

impl std::fmt::Display for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Builtin::Const(v) => write!(f, "const:{v}"),
            Builtin::Echo => f.write_str("echo"),
            Builtin::Add => f.write_str("add"),
            Builtin::Log => f.write_str("log"),
            Builtin::Errno(n, _) => write!(f, "errno:{n}"),
            Builtin::Wasm(w) => write!(f, "wasm:{}", w.path),
        }
    }
}

/// What `log` prints: out of line, so that the common builtins stay small enough to inline.
#[cold]
#[inline(never)]
fn log_call(c: &Call<'_>) {
    eprintln!(
        "vmcall: log: vCPU {} hypercall {:#x} ({}) a0={:#x} a1={:#x} a2={:#x} a3={:#x}",
        c.vcpu_id,
        c.nr,
        c.mode.name(),
        c.args[0],
        c.args[1],
        c.args[2],
        c.args[3]
    );
}

impl HypercallHandler for Builtin {
    // Inline, so that a batch's run of calls to one builtin is a loop without indirect calls.
    #[inline]
    fn call(&self, c: &Call<'_>) -> HypercallResult {
        match self {
            Builtin::Const(v) => Ok(*v),
            Builtin::Echo => Ok(c.args[0]),
            Builtin::Add => Ok(c.args.iter().fold(0u64, |s, a| s.wrapping_add(*a))),
            Builtin::Log => {
                log_call(c);
                Ok(0)
            }
            Builtin::Errno(_, code) => Err(HypercallError::Errno(*code)),
            #[cfg(feature = "wasm")]
            Builtin::Wasm(w) => w.handler.call(c),
            // Never parsed without the feature; built by hand, it answers as no handler would.
            #[cfg(not(feature = "wasm"))]
            Builtin::Wasm(_) => Err(HypercallError::Errno(vmcall_abi::errno::KVM_ENOSYS)),
        }
    }

    fn kind(&self) -> &str {
        match self {
            Builtin::Const(_) => "const",
            Builtin::Echo => "echo",
            Builtin::Add => "add",
            Builtin::Log => "log",
            Builtin::Errno(..) => "errno",
            Builtin::Wasm(_) => "wasm",
        }
    }

    fn uses_guest_memory(&self) -> bool {
        match self {
            #[cfg(feature = "wasm")]
            Builtin::Wasm(w) => w.handler.uses_guest_memory(),
            #[cfg(not(feature = "wasm"))]
            Builtin::Wasm(_) => false,
            _ => false,
        }
    }
}

/// Parse `NR=HANDLER` (as given to `vmcall run --hypercall`).
pub fn parse_assignment(s: &str) -> Result<(u64, Builtin), SpecError> {
    let (nr, spec) = s.split_once('=').ok_or(SpecError::BadAssignment)?;
    Ok((parse_u64(nr.trim())?, spec.trim().parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("const:42".parse(), Ok(Builtin::Const(42)));
        assert_eq!("const:0x10".parse(), Ok(Builtin::Const(16)));
        assert_eq!("const:-1".parse(), Ok(Builtin::Const(u64::MAX)));
        assert_eq!("errno:einval".parse(), Ok(Builtin::Errno("EINVAL", 22)));
        assert_eq!("errno:KVM_EPERM".parse(), Ok(Builtin::Errno("EPERM", 1)));
        assert!(matches!("errno:nope".parse::<Builtin>(), Err(SpecError::BadErrno(_))));
        assert!(matches!("const".parse::<Builtin>(), Err(SpecError::UnknownKind(_))));
        assert!(matches!("const:x".parse::<Builtin>(), Err(SpecError::BadNumber(_))));
        assert_eq!(parse_assignment("20=add"), Ok((20, Builtin::Add)));
        assert_eq!(parse_assignment("20"), Err(SpecError::BadAssignment));
        assert!(matches!("wasm:".parse::<Builtin>(), Err(SpecError::UnknownKind(_))));
    }

    #[cfg(feature = "wasm")]
    #[test]
    fn parses_wasm_specs_and_loads_the_module() {
        let dir = std::env::temp_dir().join(format!("vmcall-spec-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.wat");
        std::fs::write(
            &path,
            r#"(module (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
                 (i64.mul (local.get 1) (i64.const 3))))"#,
        )
        .unwrap();
        let spec = format!("20=wasm:{}", path.display());
        let (nr, b) = parse_assignment(&spec).unwrap();
        assert_eq!(nr, 20);
        assert_eq!(b.to_string(), format!("wasm:{}", path.display()));
        assert_eq!(b, b.clone(), "a clone shares the instance");
        assert_ne!(b, parse_assignment(&spec).unwrap().1, "each parse loads its own instance");
        let ram = crate::memory::GuestRam::new(2 << 20).unwrap();
        let call = Call {
            nr: 20,
            args: [5, 0, 0, 0],
            vcpu_id: 0,
            mode: crate::x86::CpuMode::Long64,
            mem: &ram,
            paging: Default::default(),
        };
        assert_eq!(b.call(&call), Ok(15));
        let err = parse_assignment("20=wasm:/nonexistent.wasm").unwrap_err();
        assert!(matches!(err, SpecError::Wasm(_)));
        assert!(err.to_string().contains("cannot read wasm handler '/nonexistent.wasm'"), "{err}");
        assert!(err.to_string().contains("No such file"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
