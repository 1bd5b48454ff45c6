//! `vmcall`: run a guest, trap its hypercalls, answer them as Linux KVM does, and add custom
//! hypercalls from the command line.
#![forbid(unsafe_code)]

mod backends;
mod bench;
mod builtin;
mod control;
mod error;
mod fault;
mod guest_file;
mod handlers;
mod instances;
mod logfmt;
mod parse;
mod replay;
mod report;
mod signals;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
pub(crate) use error::chain;
use error::Error;
use handlers::{BuildOptions, HandlerSpec};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::Call;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::seccomp::Seccomp;
use vmcall_vmm::trace::TraceSwitch;
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};
use vmcall_vmm::x86::cpuid::PvCpuid;

/// Exit status when the guest did not finish within --timeout (as timeout(1)).
const EXIT_TIMEOUT: u8 = 124;
/// `--timeout` unless given.
const DEFAULT_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));
/// Exit status for every failure vmcall reports itself at run time: an unusable image, a guest
/// crash, a host error. (Usage errors exit with clap's 2, before anything runs.)
const EXIT_FAILURE: u8 = 125;

/// The backends built into this binary, for `--version`.
#[cfg(all(feature = "kvm", feature = "emu"))]
macro_rules! backends {
    () => {
        "kvm (/dev/kvm), emu (software CPU, unicorn)"
    };
}
#[cfg(all(feature = "kvm", not(feature = "emu")))]
macro_rules! backends {
    () => {
        "kvm (/dev/kvm)"
    };
}
#[cfg(all(not(feature = "kvm"), feature = "emu"))]
macro_rules! backends {
    () => {
        "emu (software CPU, unicorn)"
    };
}
#[cfg(not(any(feature = "kvm", feature = "emu")))]
macro_rules! backends {
    () => {
        "none"
    };
}
/// Whether this binary takes WebAssembly handlers, for `--version`.
#[cfg(feature = "wasm")]
macro_rules! wasm {
    () => {
        "yes (wasm:PATH)"
    };
}
#[cfg(not(feature = "wasm"))]
macro_rules! wasm {
    () => {
        "no (built without the wasm feature)"
    };
}
/// This binary's license: the software CPU links the GPL-2.0 unicorn engine.
#[cfg(feature = "emu")]
macro_rules! license {
    () => {
        "GPL-2.0-only (this binary includes the unicorn engine; vmcall's own code is \
         Apache-2.0 OR MIT)"
    };
}
#[cfg(not(feature = "emu"))]
macro_rules! license {
    () => {
        "Apache-2.0 OR MIT"
    };
}

/// `vmcall --version`: the version, what is built in, and the license that applies.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nbackends: ",
    backends!(),
    "\nwasm handlers: ",
    wasm!(),
    "\nlicense: ",
    license!()
);

/// The exit statuses, for `--help` and the man page.
const EXIT_STATUS: &str = "Exit status (run, demo): the guest's own status (0 when every vCPU \
halted or `vmcall ctl stop` stopped it); 124 when --timeout fired; 125 when vmcall reports an \
error at run time (unreadable or malformed image, guest crash, host failure); 130/143 when \
SIGINT/SIGTERM stopped the VM; 2 for a usage error (nothing ran). A guest that itself exits \
with 124 or 125 looks the same: vmcall's own errors and timeouts are the ones that print \
`vmcall: error:` on stderr. `vmcall info`: 0 when a backend can run guests here, 1 when none \
can. `vmcall ctl`: 0 ok, 1 an error reply or unreachable VM, 2 a usage error.";

#[derive(Parser, Debug)]
#[command(
    name = "vmcall",
    version,
    long_version = LONG_VERSION,
    about = "Run a guest VM, trap its VMCALL/VMMCALL hypercalls, and add custom hypercalls at run time",
    long_about = "Run a guest VM, trap its VMCALL/VMMCALL hypercalls and answer them exactly as \
Linux KVM's kvm_emulate_hypercall does; add, replace and remove custom hypercalls without \
rebuilding or reloading the kernel.",
    after_help = "Exit status: the guest's own, 124 on --timeout, 125 on an error vmcall reports, 2 on a usage error (--help: more).",
    after_long_help = EXIT_STATUS,
)]
struct Cli {
    /// Print only warnings and errors: no notes on what vmcall does (backend, socket, ...).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More log output on stderr: -v info, -vv debug, -vvv trace. RUST_LOG (e.g.
    /// `RUST_LOG=vmcall=debug`), when set, chooses instead. NO_COLOR turns colours off.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest ELF.
    Run(RunArgs),
    /// Run the built-in demo guest (standard hypercalls and the custom hypercall 20); with
    /// --loop, a guest that calls hypercall 20 forever, printing each new answer.
    Demo(DemoArgs),
    /// Show what this host offers: /dev/kvm, capabilities, CPU vendor, working trap strategies.
    /// Exit status 0 when a backend can run guests here, 1 when none can.
    Info(InfoArgs),
    /// Measure what a hypercall costs through each path, against the kernel's own path and a
    /// bare exit, in one interleaved run (docs/bench.md).
    Bench(BenchArgs),
    /// Talk to a running VM's control socket (`vmcall run --control`): list, set, override and
    /// remove handlers, read statistics, switch the trace, stop it (docs/control.md). Exit
    /// status: 0 ok, 1 an error reply or an unreachable VM, 2 a usage error.
    Ctl(CtlArgs),
    /// Answer a recording's hypercalls (`vmcall run --record`) again — with the recorded
    /// handlers or others given here, without a guest — and print what changed; or re-run the
    /// guest (--guest) and compare its hypercalls with the recording (docs/record.md). Exit
    /// status: 0 the same, 1 something differs, 2 a usage error, 125 an error.
    Replay(replay::ReplayArgs),
    /// Print the --stats report of a recording (docs/record.md).
    Stats(replay::StatsArgs),
    /// Print a shell completion script for SHELL on stdout, e.g.
    /// `vmcall completions bash > ~/.local/share/bash-completion/completions/vmcall`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print vmcall's man page (roff) on stdout, e.g. `vmcall man | man -l -`.
    Man,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Run the loop guest instead: it calls hypercall 20 with a0 = 7 forever (answered by
    /// a0 + 1 until you change it, e.g. with `vmcall ctl PATH set 20=const:2`) and prints each
    /// new answer; stop it with Ctrl-C or `vmcall ctl PATH stop`.
    #[arg(long = "loop")]
    looping: bool,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The control socket (printed by `vmcall run --control` when it starts).
    socket: PathBuf,
    /// Print the raw JSON reply instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Registered hypercalls: number, name, kind, calls so far.
    List,
    /// Register a handler for NR, or replace the one it has: NR=KIND.
    Set {
        #[arg(value_name = "NR=KIND")]
        assignment: String,
    },
    /// Install a handler for any number, standard KVM_HC_* ones included: NR=KIND.
    Override {
        #[arg(value_name = "NR=KIND")]
        assignment: String,
    },
    /// Remove the handler of NR (a standard number gets KVM's behaviour back).
    Remove {
        #[arg(value_name = "NR")]
        nr: String,
    },
    /// Statistics so far: per number and vCPU, count and latencies, by handler.
    Stats,
    /// Turn the per-call trace on stderr on or off.
    Trace {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Stop the VM (its run ends as if it had finished: statistics are printed and written).
    Stop,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The guest: a static ELF64 x86-64 executable (docs/guest-abi.md), or a multiboot kernel
    /// (ELF32, ELF64 or raw with multiboot load addresses), as for QEMU's -kernel.
    guest: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
    /// Run N copies of the guest at once in this process, sharing the hypercall handlers;
    /// `{instance}` in the guest's command line becomes each one's number, and each console
    /// line is prefixed `[i] `. Not with --control, --stats-json or --trace-json.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    instances: u32,
    /// Command line passed to the guest (after `--`).
    #[arg(last = true)]
    cmdline: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Hypercalls per KVM run (at least 1).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    calls: u64,
    /// Hypercalls per software-CPU run (at least 1).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    emu_calls: u64,
    /// Rounds: every measurement runs once per round, in turn.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Also write the results as JSON to this file (`-`: stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Measure density instead: N VMs at once in one process on each backend (fleets of 1,
    /// 10, 100, ... up to N), their start latency, RSS per VM and hypercalls/s (docs/bench.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    density: Option<u32>,
    /// One fleet of `--density`, run in a process of its own: BACKEND:N (internal).
    #[arg(long, value_name = "BACKEND:N", hide = true)]
    density_step: Option<String>,
    /// Exit with status 125 when a target is missed (after printing the whole report), with
    /// `--density` too (its targets are judged at N >= 1000); without it the report is all,
    /// whatever the verdicts.
    #[arg(long)]
    check: bool,
}

#[derive(Args, Debug)]
struct VmArgs {
    /// Backend: kvm (/dev/kvm), emu (software CPU), or auto: kvm when /dev/kvm is usable,
    /// else emu.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "emu"])]
    backend: String,
    /// How the guest boots: multiboot (32-bit protected mode, as QEMU's -kernel), elf64
    /// (vmcall's own contract, 64-bit long mode), or auto: multiboot when the image has a
    /// multiboot header in its first 8 KiB (docs/guest-abi.md).
    #[arg(long, default_value = "auto", value_name = "PROTOCOL", value_parser = ["auto", "elf64", "multiboot"])]
    boot: String,
    /// What the other vendor's hypercall instruction does (VMCALL on AMD, VMMCALL on Intel):
    /// patch (KVM's default FIX_HYPERCALL_INSN quirk: rewritten to the native one, then
    /// answered), ud (the quirk off: #UD in the guest), or answer (answered, nothing rewritten).
    #[arg(long, default_value = "patch", value_name = "MODE", value_parser = ["patch", "ud", "answer"])]
    foreign_hypercall: String,
    /// The PV features CPUID leaf 0x40000001 advertises (default: what vmcall implements,
    /// KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SCHED_YIELD).
    #[arg(long, value_name = "MASK", value_parser = parse::pv_features)]
    pv_features: Option<u32>,
    /// Refuse hypercalls (-KVM_ENOSYS) and PV MSRs (#GP) whose feature --pv-features does not
    /// offer, as KVM_CAP_ENFORCE_PV_FEATURE_CPUID does (off by default, as in KVM).
    #[arg(long)]
    enforce_pv_cpuid: bool,
    /// How the KVM backend traps hypercalls: auto, rewrite, ud, hwbp or xen (docs/kvm-backend.md).
    #[arg(long, default_value = "auto", value_name = "STRATEGY", value_parser = ["auto", "rewrite", "ud", "hwbp", "xen"])]
    trap: String,
    /// Guest RAM, e.g. 32M or 1G (a multiple of 2M, 2M..=64G).
    #[arg(long, default_value = "32M", value_name = "SIZE", value_parser = parse::memory)]
    memory: u64,
    /// Number of vCPUs (1..=64).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(vmcall_abi::layout::MAX_VCPUS)))]
    vcpus: u32,
    /// Stop the guest after this long, e.g. 10s, 500ms; 0 (in any unit: 0s, 0ms) or none for
    /// no limit.
    /// [default: 30s; none for `demo --loop`]
    #[arg(long, value_name = "DUR", value_parser = parse::timeout)]
    timeout: Option<parse::Timeout>,
    /// Add a custom hypercall: NR=HANDLER, with HANDLER one of const:V, echo, add, log,
    /// errno:NAME, exec:CMD (docs/hypercalls.md), wasm:PATH (a WebAssembly module, docs/wasm.md).
    /// Repeatable.
    #[arg(long = "hypercall", value_name = "NR=HANDLER", value_parser = handlers::parse_custom_assignment)]
    hypercalls: Vec<(u64, HandlerSpec)>,
    /// Like --hypercall, but may replace a standard KVM_HC_* number's behaviour.
    #[arg(long = "override", value_name = "NR=HANDLER", value_parser = handlers::parse_assignment)]
    overrides: Vec<(u64, HandlerSpec)>,
    /// Per-call deadline of exec: handlers (then the guest gets -KVM_EFAULT and the process
    /// is restarted).
    #[arg(long, default_value = "1s", value_name = "DUR", value_parser = parse::deadline)]
    exec_deadline: Duration,
    /// Open a control socket for `vmcall ctl` (mode 0600, this user only); without a value,
    /// $XDG_RUNTIME_DIR/vmcall/<pid>.sock (docs/control.md).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
    control: Option<String>,
    /// Print statistics at exit: per hypercall number (`--stats`, `--stats=nr`) or per vCPU
    /// and number (`--stats=vcpu`): count, share of calls and of host time,
    /// min/mean/median/p99/max host latency, totals.
    #[arg(long, value_name = "VIEW", num_args = 0..=1, require_equals = true, default_missing_value = "nr", value_parser = ["nr", "vcpu"])]
    stats: Option<String>,
    /// Record every hypercall to FILE (JSON Lines, docs/record.md) for `vmcall replay` and
    /// `vmcall stats`; `-`: stdout (the guest's console then goes to stderr).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Write the statistics as JSON at exit: per number and vCPU, by handler (`-`: stdout).
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Print a trace line for every hypercall (to stderr); `vmcall ctl trace on|off` switches
    /// it while the VM runs.
    #[arg(long)]
    trace: bool,
    /// Write one JSON object per hypercall to FILE (`-`: stdout).
    #[arg(long, value_name = "FILE")]
    trace_json: Option<PathBuf>,
    /// Run without the seccomp filters that otherwise confine every vCPU thread and the main
    /// thread (docs/security.md): for debugging only, e.g. under a tracer.
    #[arg(long)]
    no_seccomp: bool,
    /// Wait for gdb on 127.0.0.1:PORT before the guest's first instruction (0: any free port,
    /// printed); --timeout then defaults to none (docs/gdb.md).
    #[cfg(feature = "gdb")]
    #[arg(long, value_name = "PORT")]
    gdb: Option<u16>,
    /// With --gdb: stop the guest just before hypercall NR is answered, as gdb's
    /// `catch syscall NR` does. Repeatable.
    #[cfg(feature = "gdb")]
    #[arg(long, value_name = "NR", requires = "gdb", value_parser = vmcall_vmm::hypercall::handlers::parse_u64)]
    gdb_break_on_hypercall: Vec<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    error::set_quiet(cli.quiet);
    // The per-call trace (--trace, `vmcall ctl trace`) belongs to the VMs of run and demo;
    // info's and bench's own VMs never print it.
    init_tracing(cli.verbose, matches!(cli.command, Command::Run(_) | Command::Demo(_)));
    if let Err(e) = check_usage(&cli.command) {
        e.exit();
    }
    let result = match cli.command {
        Command::Run(args) => {
            guest_file::read(&args.guest, guest_file::image_limit(args.vm.memory)).and_then(
                |image| {
                    let name = args.guest.display().to_string();
                    let cmdline = args.cmdline.join(" ");
                    if args.instances > 1 {
                        instances::run(image, &name, &args.vm, cmdline, args.instances)
                    } else {
                        run(image, &name, &args.vm, cmdline, None, DEFAULT_TIMEOUT)
                    }
                },
            )
        }
        Command::Demo(DemoArgs { looping: false, vm }) => run(
            builtin::DEMO.to_vec(),
            "demo",
            &vm,
            String::new(),
            Some(demo_table()),
            DEFAULT_TIMEOUT,
        ),
        Command::Demo(DemoArgs { looping: true, vm }) => {
            run(builtin::HCLOOP.to_vec(), "hcloop", &vm, "0 20 7".into(), Some(demo_table()), None)
        }
        Command::Info(args) => {
            let usable = backends::info(args.json);
            return if usable { ExitCode::SUCCESS } else { ExitCode::from(1) };
        }
        Command::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS).map_err(Error::Bench),
        Command::Replay(args) => replay::replay(&args).map_err(Error::Record),
        Command::Stats(args) => replay::stats(&args).map_err(Error::Record),
        Command::Ctl(args) => {
            use control::client::Command as C;
            let cmd = match args.command {
                CtlCommand::List => C::List,
                CtlCommand::Set { assignment } => C::Set(assignment),
                CtlCommand::Override { assignment } => C::Override(assignment),
                CtlCommand::Remove { nr } => C::Remove(nr),
                CtlCommand::Stats => C::Stats,
                CtlCommand::Trace { state } => C::Trace(state == "on"),
                CtlCommand::Stop => C::Stop,
            };
            return ExitCode::from(control::client::run(&args.socket, &cmd, args.json));
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "vmcall", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => match man_page() {
            // `vmcall man | head` is no error.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(Error::io("cannot write the man page", e))
            }
            _ => Ok(ExitCode::SUCCESS),
        },
    };
    result.unwrap_or_else(|e| {
        error::report(&e);
        ExitCode::from(EXIT_FAILURE)
    })
}

/// Usage errors that need more than one argument to see, reported as clap reports the rest
/// (exit status 2, nothing run).
fn check_usage(command: &Command) -> Result<(), clap::Error> {
    use clap::error::ErrorKind::ArgumentConflict;
    let vm = match command {
        Command::Run(a) => &a.vm,
        Command::Demo(a) => &a.vm,
        _ => return Ok(()),
    };
    let name = match command {
        Command::Run(_) => "run",
        _ => "demo",
    };
    let usage = |msg: String| {
        let mut cli = Cli::command();
        let sub = cli.find_subcommand_mut(name).expect("a subcommand of Cli");
        Err(sub.clone().bin_name(format!("vmcall {name}")).error(ArgumentConflict, msg))
    };
    let to_stdout = |p: &Option<PathBuf>| p.as_deref() == Some(std::path::Path::new("-"));
    if to_stdout(&vm.record) && (to_stdout(&vm.trace_json) || to_stdout(&vm.stats_json)) {
        return usage(
            "--record - needs stdout to itself: write the JSON trace or statistics to a file"
                .into(),
        );
    }
    if let Command::Run(run) = command {
        let one_vm_only = [
            (vm.control.is_some(), "--control"),
            (vm.stats_json.is_some(), "--stats-json"),
            (vm.trace_json.is_some(), "--trace-json"),
            (vm.record.is_some(), "--record"),
        ];
        if let Some((_, flag)) = one_vm_only.iter().find(|(set, _)| run.instances > 1 && *set) {
            return usage(format!("{flag} works with one VM; not with --instances"));
        }
    }
    if vm.backend == "emu" && vm.trap != "auto" {
        return usage(format!(
            "--trap {} needs the kvm backend: the software CPU (--backend emu) traps every \
             hypercall where it executes and has no trap strategies",
            vm.trap
        ));
    }
    // Numbers the demo's own table already answers, then each --hypercall in turn.
    let mut taken: Vec<u64> = match command {
        Command::Demo(_) => demo_table().numbers(),
        _ => Vec::new(),
    };
    for (nr, spec) in &vm.hypercalls {
        if taken.contains(nr) {
            return usage(format!(
                "--hypercall {nr}={spec}: hypercall {nr} already has a handler (use --override \
                 to replace it)"
            ));
        }
        taken.push(*nr);
    }
    Ok(())
}

/// `vmcall man`: the man page of the command and its subcommands, from the same definitions as
/// `--help` (the exit statuses are its after-help text).
fn man_page() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let cmd = Cli::command();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    // Each subcommand's options, which the page above only names.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        writeln!(out, ".SH \"VMCALL {}\"", sub.get_name().to_uppercase())?;
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(out, "{}", roff_escape(&about.to_string()))?;
        }
        let mut options = Vec::new();
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut options)?;
        let options = String::from_utf8_lossy(&options);
        // Without its preamble and own `.SH OPTIONS` heading: these are part of the
        // subcommand's section.
        let body = options.split_once(".SH OPTIONS\n").map_or("", |(_, body)| body);
        out.write_all(body.as_bytes())?;
    }
    writeln!(out, ".SH ENVIRONMENT\n{}", roff_escape(ENVIRONMENT))?;
    out.flush()
}

/// The environment variables vmcall reads, for the man page.
const ENVIRONMENT: &str = "RUST_LOG: log filter (tracing's syntax, e.g. vmcall=debug), \
instead of -v/-q. NO_COLOR: no colours on stderr. VMCALL_NO_KVM=1: act as if /dev/kvm were \
absent. XDG_RUNTIME_DIR: where --control puts its socket by default.";

fn roff_escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

/// The demo's hypercall 20: a0 + 1. It reads no guest memory, so `vmcall replay` answers
/// recorded calls to it without the guest.
#[derive(Debug)]
struct PlusOne;

impl vmcall_vmm::hypercall::HypercallHandler for PlusOne {
    fn call(&self, c: &Call<'_>) -> vmcall_vmm::hypercall::HypercallResult {
        Ok(c.args[0].wrapping_add(1))
    }
    fn uses_guest_memory(&self) -> bool {
        false
    }
}

/// The demo's custom hypercalls: 20 (the seed's KVM_HC_MY_VMCALL) returns a0 + 1, 21 adds.
fn demo_table() -> HypercallTable {
    let table = HypercallTable::new();
    table.register(vmcall_abi::hc::KVM_HC_MY_VMCALL, "my_vmcall", PlusOne).expect("empty table");
    table.register(21, "add", Builtin::Add).expect("free number");
    table
}

/// The seccomp mode of a run. An `exec:` handler starts its process from the vCPU thread that
/// calls it, and a process started there inherits the thread's filter (and could run nothing):
/// a run that has one, or a control socket that can install one at any time, runs its vCPU
/// threads unconfined, and says so.
fn seccomp_mode(a: &VmArgs) -> Seccomp {
    let exec =
        a.hypercalls.iter().chain(&a.overrides).any(|(_, s)| matches!(s, HandlerSpec::Exec(_)));
    if a.no_seccomp {
        Seccomp::Off
    } else if exec || a.control.is_some() {
        eprintln!(
            "vmcall: warning: vCPU threads run without seccomp filters: {} (docs/security.md)",
            if exec {
                "an exec: handler starts processes from them"
            } else {
                "--control may install exec: handlers"
            }
        );
        Seccomp::Off
    } else {
        Seccomp::VcpuThreads
    }
}

fn run(
    image: Vec<u8>,
    image_name: &str,
    a: &VmArgs,
    cmdline: String,
    base: Option<HypercallTable>,
    default_timeout: Option<Duration>,
) -> Result<ExitCode, Error> {
    let opts = BuildOptions { exec_deadline: a.exec_deadline };
    let table = run_table(a, base)?;
    let json_trace = a.trace_json.as_deref().map(report::JsonTrace::create).transpose()?;
    let to_stdout = |p: &Option<PathBuf>| p.as_deref() == Some(std::path::Path::new("-"));
    let recorder = a.record.as_deref().map(replay::recorder).transpose().map_err(Error::Record)?;
    let header_cmdline = cmdline.clone();
    let hv = backends::select(&a.backend, &a.trap)?;
    #[cfg(feature = "gdb")]
    let default_timeout = if a.gdb.is_some() { None } else { default_timeout };
    let seccomp = seccomp_mode(a);
    let mut builder =
        vm_builder(image, image_name, a, cmdline, table.clone(), default_timeout, seccomp)?;
    let mut sinks: Vec<Arc<dyn vmcall_vmm::trace::CallSink>> = Vec::new();
    if let Some(t) = &json_trace {
        sinks.push(t.clone());
    }
    if let Some(r) = &recorder {
        sinks.push(r.clone());
        if to_stdout(&a.record) {
            builder = builder.console(Box::new(std::io::stderr()));
        }
    }
    if sinks.len() > 1 {
        builder = builder.sink(Arc::new(vmcall_vmm::trace::Fanout(sinks)));
    } else if let Some(sink) = sinks.pop() {
        builder = builder.sink(sink);
    }
    #[cfg(feature = "gdb")]
    let gdb_addr = match a.gdb {
        Some(port) => {
            let (session, addr) = gdb_session(port, a.gdb_break_on_hypercall.clone())?;
            builder = builder.gdb(session);
            Some(addr)
        }
        None => None,
    };
    let vm = builder.build(hv.as_ref())?;
    note!("vmcall: {}", vm.describe());
    #[cfg(feature = "gdb")]
    if let Some(addr) = gdb_addr {
        // Not a note: whoever asked for --gdb needs the address, even with -q.
        eprintln!(
            "vmcall: waiting for gdb on {addr} before the first instruction \
             (gdb GUEST -ex 'target remote {addr}')"
        );
    }
    if let Some(r) = &recorder {
        let h = replay::header(a, hv.name(), vm.describe(), image_name, &header_cmdline, &table);
        r.begin(&h).map_err(|e| Error::io("cannot write the recording", e))?;
    }
    let monitor = vm.monitor();
    let control = match &a.control {
        None => None,
        Some(p) => {
            let path =
                if p.is_empty() { control::server::default_path()? } else { PathBuf::from(p) };
            let target = Arc::new(control::VmTarget { monitor: monitor.clone(), opts });
            let server = control::server::ControlServer::start(&path, target)?;
            note!("vmcall: control socket {} (vmcall ctl {0} list)", server.path().display());
            Some(server)
        }
    };
    let signals = signals::StopOnSignal::install(move || monitor.stop())?;
    let report = vm.run();
    drop(control);
    let interrupted = signals.finish();
    if let Some(t) = &json_trace {
        t.finish()?;
    }
    if let Some(r) = &recorder {
        r.finish(&replay::outcome(&report.result))
            .map_err(|e| Error::io("cannot write the recording", e))?;
    }
    if let Some(view) = &a.stats {
        let per_vcpu_view = view == "vcpu";
        let text =
            report::stats_text(&report.per_vcpu, report.elapsed, per_vcpu_view, Some(&table), true);
        eprint!("vmcall: {text}");
    }
    if let Some(path) = &a.stats_json {
        let doc = report::stats_json(&report.stats, &report.per_vcpu, report.elapsed);
        let mut text = serde_json::to_string_pretty(&doc).expect("JSON values serialise");
        text.push('\n');
        report::write_to(path, &text)?;
    }
    // Drop every handler now, so that exec: processes are killed even if a control
    // connection still holds the VM.
    for nr in table.numbers() {
        table.unregister(nr);
    }
    match report.result {
        Ok(RunStatus::Stopped) if interrupted.is_some() => {
            Ok(ExitCode::from(128 + interrupted.unwrap_or(0) as u8))
        }
        Ok(RunStatus::AllHalted | RunStatus::Stopped) => Ok(ExitCode::SUCCESS),
        Ok(RunStatus::Exited(s)) => Ok(ExitCode::from(s.min(255) as u8)),
        Err(e @ RunError::Timeout(_)) => {
            error::report(&e);
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        Err(e) if e.is_guest_fault() => Err(Error::GuestFault(fault::report(
            &e,
            error::chain(&e),
            image_name,
            report.last_calls.as_ref(),
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The hypercall table of a run: the base table (the demo's) with `--hypercall` and
/// `--override` handlers added.
fn run_table(a: &VmArgs, base: Option<HypercallTable>) -> Result<Arc<HypercallTable>, Error> {
    let opts = BuildOptions { exec_deadline: a.exec_deadline };
    let table = Arc::new(base.unwrap_or_default());
    for (nr, spec) in &a.hypercalls {
        table
            .register_shared(*nr, &spec.to_string(), spec.build(*nr, &opts))
            .map_err(|source| Error::Table { what: format!("--hypercall {nr}={spec}"), source })?;
    }
    for (nr, spec) in &a.overrides {
        table.override_shared(*nr, &spec.to_string(), spec.build(*nr, &opts));
    }
    Ok(table)
}

/// A VM as the options say, with `table`, before its console and trace sink are chosen.
fn vm_builder(
    image: Vec<u8>,
    image_name: &str,
    a: &VmArgs,
    cmdline: String,
    table: Arc<HypercallTable>,
    default_timeout: Option<Duration>,
    seccomp: Seccomp,
) -> Result<VmBuilder, Error> {
    Ok(VmBuilder::new(image)
        .memory(a.memory)
        .vcpus(a.vcpus)
        .timeout(a.timeout.map_or(default_timeout, |t| t.0))
        .cmdline(cmdline)
        // Both values are among the ones clap accepts, which all parse.
        .boot(a.boot.parse().map_err(Error::Refused)?)
        .foreign_hypercall(a.foreign_hypercall.parse().map_err(Error::Refused)?)
        .pv_cpuid(PvCpuid {
            features: a.pv_features.unwrap_or(vmcall_vmm::x86::cpuid::PV_FEATURES),
            enforce: a.enforce_pv_cpuid,
        })
        .image_name(image_name)
        .table(table)
        .trace(TraceSwitch::new(a.trace))
        // The vCPU threads, which run guest-driven code (backends, devices, handlers), are
        // confined. This thread is not: after the run it writes --stats-json/--trace-json files
        // and ends the signal thread, which a thread confined by Seccomp::AllThreads cannot.
        .seccomp(seccomp))
}

/// Listen for gdb on 127.0.0.1:`port`; the session and the address it listens on.
#[cfg(feature = "gdb")]
fn gdb_session(
    port: u16,
    breaks: Vec<u64>,
) -> Result<(vmcall_vmm::gdb::GdbSession, std::net::SocketAddr), Error> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| Error::io(format!("--gdb {port}: cannot listen on 127.0.0.1:{port}"), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("--gdb", e))?;
    Ok((vmcall_vmm::gdb::GdbSession { listener, break_on_hypercalls: breaks }, addr))
}

/// Warnings and errors (more with -v, fewer with -q, or what RUST_LOG says), and the per-call
/// trace, whose switch (`--trace`, `vmcall ctl trace`) decides whether the vCPUs emit it at all.
/// Colours only on a terminal, and never with NO_COLOR set (https://no-color.org).
fn init_tracing(verbose: u8, call_trace: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    // -q silences notes only (see `note!`): warnings and errors always print.
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty()).and_then(|v| {
        v.parse::<Targets>()
            .map_err(|e| eprintln!("vmcall: warning: ignoring RUST_LOG={v:?}: {e}"))
            .ok()
    });
    let filter = from_env.unwrap_or_else(|| Targets::new().with_default(level)).with_target(
        "vmcall::hypercall",
        if call_trace { LevelFilter::TRACE } else { LevelFilter::OFF },
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Plain text: the one `vmcall: LEVEL:` prefix style, no colours (NO_COLOR holds trivially).
        .with_ansi(false)
        .event_format(logfmt::Prefixed);
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).try_init();
}
