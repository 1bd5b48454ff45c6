//! Criterion benchmarks of the library's hot paths, without any hypervisor: what vmcall adds
//! to every hypercall on every backend (`cargo bench -p vmcall-vmm`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::hypercall::{emulate, DetachedPlatform, HypercallExit, HypercallInsn};
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::stats::VcpuStats;
use vmcall_vmm::x86::CpuMode;

fn call(nr: u64, args: [u64; 4]) -> HypercallExit {
    HypercallExit {
        nr,
        args,
        cpl: 0,
        mode: CpuMode::Long64,
        rip: 0x20_0000,
        insn: HypercallInsn::Vmcall,
        paging: vmcall_vmm::x86::PagingContext::default(),
    }
}

fn hot_paths(c: &mut Criterion) {
    let ram = GuestRam::new(4 << 20).unwrap();
    let table = HypercallTable::new();
    table.register(20, "const", Builtin::Const(0)).unwrap();
    for nr in 100..164 {
        table.register(nr, "filler", Builtin::Echo).unwrap();
    }

    c.bench_function("emulate: custom hypercall (const handler)", |b| {
        let exit = call(20, [1, 2, 3, 4]);
        b.iter(|| emulate(&table, black_box(&exit), 0, &ram, &DetachedPlatform { vcpus: 1 }))
    });
    c.bench_function("emulate: standard hypercall (VAPIC_POLL_IRQ)", |b| {
        let exit = call(1, [0; 4]);
        b.iter(|| emulate(&table, black_box(&exit), 0, &ram, &DetachedPlatform { vcpus: 1 }))
    });
    c.bench_function("emulate: unknown number", |b| {
        let exit = call(0xdead, [0; 4]);
        b.iter(|| emulate(&table, black_box(&exit), 0, &ram, &DetachedPlatform { vcpus: 1 }))
    });

    // A batch of 64 calls to the const handler, laid out in guest RAM.
    for i in 0..64u64 {
        ram.write_u64(0x10_0000 + 48 * i, 20).unwrap();
    }
    c.bench_function("emulate: batch of 64 custom hypercalls", |b| {
        let exit = call(vmcall_abi::hc::VMCALL_HC_BATCH, [0x10_0000, 64, 0, 0]);
        b.iter(|| emulate(&table, black_box(&exit), 0, &ram, &DetachedPlatform { vcpus: 1 }))
    });

    c.bench_function("stats: record one hypercall", |b| {
        let mut stats = VcpuStats::default();
        b.iter(|| {
            stats.hypercall(
                black_box(20),
                vmcall_vmm::stats::Stamp::now(),
                std::time::Duration::from_nanos(150),
            )
        })
    });

    c.bench_function("stats: record one hypercall and its handler's name", |b| {
        let mut stats = VcpuStats::default();
        let name: std::sync::Arc<str> = "const:0".into();
        b.iter(|| {
            stats.hypercall(
                black_box(20),
                vmcall_vmm::stats::Stamp::now(),
                std::time::Duration::from_nanos(150),
            );
            stats.answered_by(black_box(20), &name);
        })
    });

    c.bench_function("table: replace a handler (copy of a 65-entry table)", |b| {
        b.iter_batched(
            || Builtin::Const(1),
            |h| table.replace(20, "const", h).unwrap(),
            BatchSize::SmallInput,
        )
    });

    c.bench_function("memory: checked u64 read", |b| {
        b.iter(|| ram.read_u64(black_box(0x10_0000)).unwrap())
    });
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
