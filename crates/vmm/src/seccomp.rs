//! seccomp filters, one per kind of thread a run has: what each may still ask of the kernel
//! once the guest runs (docs/security.md, "Syscalls").
//!
//! A vCPU thread installs its filter itself, before its first guest instruction; the thread
//! that calls [`Vm::run`](crate::vm::Vm::run) installs its own once the vCPU threads have
//! started (only under [`Seccomp::AllThreads`]: a library must not confine its caller's thread
//! unasked). Each list below says who needs each syscall. A syscall outside the filter fails
//! with `EPERM` instead of killing the process: a handler that tries something unexpected gets
//! an error it can report, and the guest an answer, while nothing outside the list runs.
//!
//! What a backend's vCPU threads need beyond the common list comes from
//! [`VmBackend::syscalls`](crate::backend::VmBackend::syscalls); what a kind of
//! handler needs (pipes and polling for an exec handler, say) is declared with
//! [`VmBuilder::seccomp_allow`](crate::vm::VmBuilder::seccomp_allow). Setting
//! `VMCALL_SECCOMP_AUDIT=1` in the environment turns every refusal into an allowed, logged
//! call (`SECCOMP_RET_LOG`: the kernel log shows `type=1326 ... syscall=N`), which is how
//! these lists were found and how a new handler kind finds what it needs.

use std::borrow::Cow;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which threads of a run are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seccomp {
    /// No filter at all (`vmcall run --no-seccomp`): for debugging, e.g. under a tracer.
    Off,
    /// Every vCPU thread, from before its first guest instruction. The library's default, and
    /// what the `vmcall` command uses: the thread that calls `Vm::run` belongs to the caller.
    #[default]
    VcpuThreads,
    /// The vCPU threads, and the thread that calls `Vm::run` once they have started. That
    /// thread stays confined after `run` returns: it can open no file and start no thread, so
    /// it can run no other VM (nor write output files or end helper threads).
    AllThreads,
}

/// Which arguments a syscall may be made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Args {
    /// Any.
    Any,
    /// Argument `arg` (its low 32 bits) is one of `values`: ioctl requests, signal numbers.
    OneOf {
        /// The argument's index.
        arg: u8,
        /// The values it may take.
        values: Vec<u64>,
    },
    /// Argument `arg` has none of the bits in `mask`: `mmap`/`mprotect` without `PROT_EXEC`.
    Lacks {
        /// The argument's index.
        arg: u8,
        /// The bits it must not have.
        mask: u64,
    },
}

/// One syscall a kind of thread may make, and who needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The syscall number (`libc::SYS_*`).
    pub nr: i64,
    /// Which arguments it may have.
    pub args: Args,
    /// Who makes it, for the reader of a filter and for its error messages.
    pub who: Cow<'static, str>,
}

impl Allowed {
    /// `nr` with any arguments.
    pub fn any(nr: i64, who: impl Into<Cow<'static, str>>) -> Self {
        Self { nr, args: Args::Any, who: who.into() }
    }

    /// `nr` with argument `arg` one of `values`.
    pub fn one_of(nr: i64, arg: u8, values: &[u64], who: impl Into<Cow<'static, str>>) -> Self {
        Self { nr, args: Args::OneOf { arg, values: values.to_vec() }, who: who.into() }
    }

    /// `nr` with none of `mask`'s bits in argument `arg`.
    pub fn lacking(nr: i64, arg: u8, mask: u64, who: impl Into<Cow<'static, str>>) -> Self {
        Self { nr, args: Args::Lacks { arg, mask }, who: who.into() }
    }
}

/// A filter could not be built or installed (a host fault: the rules are vmcall's and the
/// backend's, not the guest's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeccompError {
    /// The rule for one syscall could not be built.
    #[error("the rule for syscall {nr} ({who})")]
    Rule {
        /// The syscall number.
        nr: i64,
        /// Who needs it.
        who: String,
        /// seccompiler's error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The filter could not be compiled.
    #[error("compiling the filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused to install the filter on the thread.
    #[error("installing the filter")]
    Install(#[source] seccompiler::Error),
}

/// The kinds of threads a run confines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The thread that called `Vm::run`, once the vCPU threads run.
    Main,
    /// The gdb stub's thread (`vmcall run --gdb`, feature `gdb`), from before it accepts its
    /// connection: everything it receives is parsed under the filter.
    Gdb,
}

use libc::{
    SYS_brk, SYS_clock_gettime, SYS_clock_nanosleep, SYS_close, SYS_exit, SYS_exit_group,
    SYS_fcntl, SYS_futex, SYS_getcwd, SYS_getpid, SYS_getrandom, SYS_gettid, SYS_gettimeofday,
    SYS_madvise, SYS_mmap, SYS_mprotect, SYS_mremap, SYS_munmap, SYS_nanosleep, SYS_rt_sigprocmask,
    SYS_rt_sigreturn, SYS_sched_yield, SYS_sigaltstack, SYS_tgkill, SYS_write, SYS_writev,
};

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const SIGABRT: u64 = libc::SIGABRT as u64;
const F_GETFD: u64 = libc::F_GETFD as u64;

/// What every thread of a run needs, whatever it does: memory, locks, time, its own end.
fn common() -> Vec<Allowed> {
    vec![
        // The allocator (glibc malloc: brk for the main heap, mmap/munmap/mremap for large
        // blocks and per-thread arenas, mprotect to grow an arena, madvise to return memory).
        // Never executable memory.
        Allowed::any(SYS_brk, "allocator"),
        Allowed::lacking(SYS_mmap, 2, PROT_EXEC, "allocator (never PROT_EXEC)"),
        Allowed::lacking(SYS_mprotect, 2, PROT_EXEC, "allocator arenas (never PROT_EXEC)"),
        Allowed::any(SYS_munmap, "allocator; a thread's stack and signal stack at its end"),
        Allowed::any(SYS_mremap, "allocator (growing large blocks)"),
        Allowed::any(SYS_madvise, "allocator; glibc returning a finished thread's stack"),
        // Mutexes, condition variables, once cells, thread joins.
        Allowed::any(
            SYS_futex,
            "locks: the hypercall table's writer, console, halt/kick, end of run",
        ),
        Allowed::any(SYS_sched_yield, "KVM_HC_SCHED_YIELD and KVM_HC_KICK_CPU (yield_to)"),
        // Clocks (normally the vDSO answers without a syscall; these are its fallbacks).
        Allowed::any(SYS_clock_gettime, "statistics' latencies, KVM_HC_CLOCK_PAIRING"),
        Allowed::any(SYS_gettimeofday, "vDSO fallback"),
        Allowed::any(SYS_nanosleep, "std::thread::sleep in handlers"),
        Allowed::any(SYS_clock_nanosleep, "std::thread::sleep in handlers"),
        // Console and diagnostics: COM1 goes to stdout, traces, logs and panics to stderr
        // (whatever fds the host gave them: the writes themselves are not restricted).
        Allowed::any(SYS_write, "console output (stdout), traces and panic messages (stderr)"),
        Allowed::any(SYS_writev, "buffered console output"),
        // Thread and process end.
        Allowed::any(SYS_sigaltstack, "Rust's stack-overflow handler, removed at thread end"),
        Allowed::any(SYS_rt_sigprocmask, "glibc at thread end and in abort()"),
        Allowed::any(SYS_close, "dropping a vCPU or VM: its file descriptors"),
        Allowed::one_of(
            SYS_fcntl,
            1,
            &[F_GETFD],
            "std's check, in debug builds, that an fd it closes is open",
        ),
        Allowed::any(SYS_exit, "thread end"),
        Allowed::any(SYS_exit_group, "process end"),
        Allowed::any(SYS_getpid, "abort() after a double panic"),
        Allowed::any(SYS_gettid, "panic messages (the thread id) and abort()"),
        Allowed::any(SYS_getcwd, "panic backtraces (paths relative to it)"),
        // tgkill(tgid, tid, sig): the signal is the third argument.
        Allowed::one_of(SYS_tgkill, 2, &[SIGABRT], "abort() after a double panic: SIGABRT only"),
        // HashMap's random keys, once per thread that builds one (a handler may).
        Allowed::any(SYS_getrandom, "std's HashMap keys"),
    ]
}

/// What a vCPU thread needs beyond [`common`]: the backend's own calls come from the backend.
fn vcpu() -> Vec<Allowed> {
    vec![Allowed::any(
        SYS_rt_sigreturn,
        "returning from the signal that kicks a vCPU out of its run",
    )]
}

/// What the thread that called `Vm::run` needs once vCPU threads run, beyond [`common`].
fn main_thread() -> Vec<Allowed> {
    vec![
        // pthread_kill: the KVM backend's interrupter kicks a vCPU out of KVM_RUN with a
        // signal when the run ends or times out.
        Allowed::any(SYS_tgkill, "stopping vCPUs: the KVM backend's kick signal"),
        Allowed::any(SYS_rt_sigreturn, "signal handlers"),
    ]
}

/// What the gdb stub's thread needs beyond [`common`]: one connection on the socket it was
/// given. It reads and writes guest memory through the RAM mapping (no syscall), and the
/// vCPU threads do everything that touches a backend for it, but for stopping them: a
/// backend adds what its kick needs (KVM: its signal).
fn gdb() -> Vec<Allowed> {
    const IPPROTO_TCP: u64 = libc::IPPROTO_TCP as u64;
    vec![
        Allowed::any(libc::SYS_accept4, "gdb stub: accepting its one connection"),
        Allowed::any(libc::SYS_recvfrom, "gdb stub: reading gdb's packets"),
        Allowed::any(libc::SYS_sendto, "gdb stub: its replies"),
        Allowed::one_of(
            libc::SYS_ioctl,
            1,
            &[libc::FIONBIO],
            "gdb stub: non-blocking peeks for Ctrl-C while the guest runs",
        ),
        Allowed::one_of(libc::SYS_setsockopt, 1, &[IPPROTO_TCP], "gdb stub: TCP_NODELAY"),
        Allowed::any(SYS_rt_sigreturn, "a process signal's handler, should it run on this thread"),
    ]
}

/// The rules of a thread kind: the common list, the kind's own, and `extra` (the backend's
/// and the handlers' declarations).
pub fn rules(kind: ThreadKind, extra: &[Allowed]) -> Vec<Allowed> {
    let mut all = common();
    all.extend(match kind {
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Main => main_thread(),
        ThreadKind::Gdb => gdb(),
    });
    all.extend(extra.iter().cloned());
    all
}

/// The BPF program for `rules`: each syscall allowed under any of its entries' conditions,
/// every other syscall failing with `EPERM` (or, with `audit`, allowed and logged).
pub fn compile(rules: &[Allowed], audit: bool) -> Result<BpfProgram, SeccompError> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for a in rules {
        let cond = |arg: u8, op: SeccompCmpOp, value: u64| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|source| SeccompError::Rule { nr: a.nr, who: a.who.to_string(), source })
        };
        let new: Option<Vec<SeccompRule>> = match &a.args {
            Args::Any => None,
            Args::OneOf { arg, values } => Some(
                values
                    .iter()
                    .map(|v| cond(*arg, SeccompCmpOp::Eq, *v))
                    .collect::<Result<_, _>>()?,
            ),
            Args::Lacks { arg, mask } => Some(vec![cond(*arg, SeccompCmpOp::MaskedEq(*mask), 0)?]),
        };
        match (map.entry(a.nr).or_insert_with(|| Some(Vec::new())), new) {
            // Any arguments: unconditional, whatever else was asked for it.
            (slot, None) => *slot = None,
            (Some(list), Some(more)) => list.extend(more),
            (None, Some(_)) => {}
        }
    }
    let map = map.into_iter().map(|(nr, rules)| (nr, rules.unwrap_or_default())).collect();
    let refuse = if audit { SeccompAction::Log } else { SeccompAction::Errno(libc::EPERM as u32) };
    let filter = SeccompFilter::new(map, refuse, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Compile)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Whether `VMCALL_SECCOMP_AUDIT` asks for logging instead of refusing.
pub fn audit_requested() -> bool {
    std::env::var_os("VMCALL_SECCOMP_AUDIT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Install `program` on the calling thread (for good: a seccomp filter cannot be removed).
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_and_says_who_needs_each_call() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Main, ThreadKind::Gdb] {
            let rules = rules(kind, &[]);
            assert!(rules.iter().all(|a| !a.who.is_empty()));
            assert!(compile(&rules, false).is_ok());
            assert!(compile(&rules, true).is_ok());
        }
    }

    #[test]
    fn an_unconditional_entry_wins_over_conditions_for_the_same_call() {
        let narrow = [Allowed::lacking(SYS_mmap, 2, PROT_EXEC, "a")];
        let wide = [Allowed::lacking(SYS_mmap, 2, PROT_EXEC, "a"), Allowed::any(SYS_mmap, "jit")];
        assert!(compile(&wide, false).unwrap().len() < compile(&narrow, false).unwrap().len());
        let bad = [Allowed::one_of(SYS_write, 9, &[1], "no such argument")];
        assert!(compile(&bad, false).unwrap_err().to_string().contains("no such argument"));
    }
}
