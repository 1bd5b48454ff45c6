//! `vmcall`: run a guest, trap its hypercalls, answer them as Linux KVM does, and add custom
//! hypercalls from the command line.
#![forbid(unsafe_code)]

mod backends;
mod bench;
mod guest_file;
mod parse;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use vmcall_vmm::hypercall::handlers::{self, Builtin};
use vmcall_vmm::hypercall::Call;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::seccomp::Seccomp;
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};

/// Exit status when the guest did not finish within --timeout (as timeout(1)).
const EXIT_TIMEOUT: u8 = 124;
/// Exit status for every failure vmcall reports itself: bad input, a guest crash, a host error.
const EXIT_FAILURE: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "vmcall",
    version,
    about = "Run a guest VM, trap its VMCALL/VMMCALL hypercalls, and add custom hypercalls at run time",
    long_about = "Run a guest VM, trap its VMCALL/VMMCALL hypercalls and answer them exactly as \
Linux KVM's kvm_emulate_hypercall does; add, replace and remove custom hypercalls without \
rebuilding or reloading the kernel.\n\nExit status: the guest's own status (0 when every vCPU \
halted), 124 on --timeout, 125 when vmcall reports an error (bad input, guest crash, host failure)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest ELF.
    Run(RunArgs),
    /// Run the built-in demo guest (standard hypercalls and the custom hypercall 20).
    Demo(VmArgs),
    /// Show what this host offers: /dev/kvm, capabilities, CPU vendor, working trap strategies.
    Info,
    /// Measure what a hypercall costs through each path, against the kernel's own path and a
    /// bare exit, in one interleaved run (docs/bench.md).
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The guest: a static ELF64 x86-64 executable (see docs/guest-abi.md).
    guest: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
    /// Command line passed to the guest (after `--`).
    #[arg(last = true)]
    cmdline: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Hypercalls per KVM run.
    #[arg(long, default_value_t = 2000)]
    calls: u64,
    /// Hypercalls per software-CPU run.
    #[arg(long, default_value_t = 200_000)]
    emu_calls: u64,
    /// Rounds: every measurement runs once per round, in turn.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct VmArgs {
    /// Backend: kvm (/dev/kvm), emu (software CPU), or auto: kvm when /dev/kvm is usable,
    /// else emu.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "emu"])]
    backend: String,
    /// How the KVM backend traps hypercalls: auto, rewrite, ud, hwbp or xen (docs/kvm-backend.md).
    #[arg(long, default_value = "auto", value_name = "STRATEGY", value_parser = ["auto", "rewrite", "ud", "hwbp", "xen"])]
    trap: String,
    /// Guest RAM, e.g. 32M or 1G (a multiple of 2M, 2M..=64G).
    #[arg(long, default_value = "32M", value_name = "SIZE", value_parser = parse::size)]
    memory: u64,
    /// Number of vCPUs (1..=64).
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Stop the guest after this long, e.g. 10s, 500ms; 0 or none for no limit.
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = parse::timeout)]
    timeout: parse::Timeout,
    /// Add a custom hypercall: NR=HANDLER, with HANDLER one of const:V, echo, add, log,
    /// errno:NAME. Repeatable.
    #[arg(long = "hypercall", value_name = "NR=HANDLER", value_parser = handlers::parse_assignment)]
    hypercalls: Vec<(u64, Builtin)>,
    /// Like --hypercall, but may replace a standard KVM_HC_* number's behaviour.
    #[arg(long = "override", value_name = "NR=HANDLER", value_parser = handlers::parse_assignment)]
    overrides: Vec<(u64, Builtin)>,
    /// Print per-hypercall statistics (count, share, min/median/p99/max host latency) at exit.
    #[arg(long)]
    stats: bool,
    /// Print a trace line for every hypercall (to stderr).
    #[arg(long)]
    trace: bool,
    /// Run without the seccomp filters that otherwise confine every vCPU thread and the main
    /// thread (docs/security.md): for debugging only, e.g. under a tracer.
    #[arg(long)]
    no_seccomp: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            guest_file::read(&args.guest, guest_file::image_limit(args.vm.memory))
                .and_then(|image| run(image, &args.vm, args.cmdline.join(" "), None))
        }
        Command::Demo(vm) => {
            run(vmcall_test_guests::DEMO_ELF.to_vec(), &vm, String::new(), Some(demo_table()))
        }
        Command::Info => {
            backends::print_info();
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|msg| {
        eprintln!("vmcall: error: {msg}");
        ExitCode::from(EXIT_FAILURE)
    })
}

/// The demo's custom hypercalls: 20 (the seed's KVM_HC_MY_VMCALL) returns a0 + 1, 21 adds.
fn demo_table() -> HypercallTable {
    let table = HypercallTable::new();
    table
        .register(vmcall_abi::hc::KVM_HC_MY_VMCALL, "my_vmcall", |c: &Call<'_>| {
            Ok(c.args[0].wrapping_add(1))
        })
        .expect("empty table");
    table.register(21, "add", Builtin::Add).expect("free number");
    table
}

/// An error and each of its sources, one per line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s += &format!("\n  caused by: {cause}");
        src = cause.source();
    }
    s
}

fn run(
    image: Vec<u8>,
    a: &VmArgs,
    cmdline: String,
    base: Option<HypercallTable>,
) -> Result<ExitCode, String> {
    init_tracing(a.trace);
    let table = Arc::new(base.unwrap_or_default());
    for (nr, b) in &a.hypercalls {
        let name = b.to_string();
        table
            .register(*nr, &name, b.clone())
            .map_err(|e| format!("--hypercall {nr}={b}: {e} (use --override)"))?;
    }
    for (nr, b) in &a.overrides {
        table.override_standard(*nr, &b.to_string(), b.clone());
    }
    let hv = backends::select(&a.backend, &a.trap)?;
    let vm = VmBuilder::new(image)
        .memory(a.memory)
        .vcpus(a.vcpus)
        .timeout(a.timeout.0)
        .cmdline(cmdline)
        .table(table.clone())
        .seccomp(if a.no_seccomp { Seccomp::Off } else { Seccomp::AllThreads })
        .build(hv.as_ref())
        .map_err(|e| chain(&e))?;
    eprintln!("vmcall: {}", vm.describe());
    let report = vm.run();
    if a.stats {
        eprintln!(
            "vmcall: {} hypercalls in {:.3}s\n{}",
            report.stats.total_hypercalls(),
            report.elapsed.as_secs_f64(),
            report.stats.table(Some(&table))
        );
    }
    match report.result {
        Ok(RunStatus::AllHalted | RunStatus::Stopped) => Ok(ExitCode::SUCCESS),
        Ok(RunStatus::Exited(s)) => Ok(ExitCode::from(s.min(255) as u8)),
        Err(e @ RunError::Timeout(_)) => {
            eprintln!("vmcall: error: {e}");
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
        Err(e) => Err(chain(&e)),
    }
}

fn init_tracing(trace: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = if trace {
        Targets::new()
            .with_default(LevelFilter::WARN)
            .with_target("vmcall::hypercall", LevelFilter::TRACE)
    } else {
        Targets::new().with_default(LevelFilter::WARN)
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false);
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).try_init();
}
