//! A tiny machine for driving the emulator backend directly: hand-assembled guests that own
//! their page tables, GDT, IDT and TSS, run on one vCPU with a timeout.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmcall_emu::EmuHypervisor;
use vmcall_vmm::backend::{GuestInfo, Hypervisor, InlineExits, VcpuExit};
use vmcall_vmm::boot::VcpuInit;
use vmcall_vmm::hypercall::HypercallExit;
use vmcall_vmm::memory::GuestRam;
use vmcall_vmm::x86::{DescriptorTable, Regs, Segment, SpecialRegs};

pub const RAM: u64 = 4 << 20;
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
/// 4 KiB page table of the first 2 MiB (identity, writable, user).
pub const PT: u64 = 0x4000;
pub const GDT: u64 = 0x5000;
pub const IDT: u64 = 0x6000;
pub const TSS: u64 = 0x7000;
/// TSS.RSP0 and TSS.IST1.
pub const RSP0: u64 = 0x9000;
pub const IST1: u64 = 0xb000;
pub const CODE: u64 = 0x10000;
/// Handlers live from here, `HANDLER_STRIDE` apart.
pub const HANDLERS: u64 = 0x11000;
pub const HANDLER_STRIDE: u64 = 0x100;
pub const STACK: u64 = 0x20000;
pub const USER_STACK: u64 = 0x30000;
/// What each recording handler stores, 0x100 bytes per vector (see [`Asm::recording_handler`]).
pub const RECORDS: u64 = 0x40000;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x23;
pub const USER_CS: u16 = 0x2b;
pub const TSS_SEL: u16 = 0x30;
pub const CS32: u16 = 0x40;
pub const DS32: u16 = 0x48;

/// Hand assembly of the few instructions the guests use.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }
    /// mov rax, imm64
    pub fn mov_rax(&mut self, v: u64) -> &mut Self {
        self.b(&[0x48, 0xb8]).b(&v.to_le_bytes())
    }
    /// mov rbx, imm64
    pub fn mov_rbx(&mut self, v: u64) -> &mut Self {
        self.b(&[0x48, 0xbb]).b(&v.to_le_bytes())
    }
    /// mov rcx, imm64
    pub fn mov_rcx(&mut self, v: u64) -> &mut Self {
        self.b(&[0x48, 0xb9]).b(&v.to_le_bytes())
    }
    /// mov [abs64], rax
    pub fn store_rax(&mut self, at: u64) -> &mut Self {
        self.b(&[0x48, 0xa3]).b(&at.to_le_bytes())
    }
    /// mov rax, [abs64]
    pub fn load_rax(&mut self, at: u64) -> &mut Self {
        self.b(&[0x48, 0xa1]).b(&at.to_le_bytes())
    }
    /// mov rax, [rsp + off]
    pub fn rax_from_stack(&mut self, off: u8) -> &mut Self {
        self.b(&[0x48, 0x8b, 0x44, 0x24, off])
    }
    /// jmp rcx
    pub fn jmp_rcx(&mut self) -> &mut Self {
        self.b(&[0xff, 0xe1])
    }
    pub fn vmcall(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x01, 0xc1])
    }
    pub fn ud2(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x0b])
    }
    /// out imm8, al: the test sink ends the run on any port write.
    pub fn done(&mut self) -> &mut Self {
        self.b(&[0xe6, 0x80])
    }
    /// rdtsc; shl rdx, 32; or rax, rdx
    pub fn rdtsc64(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0])
    }
    /// push imm8 (sign-extended)
    pub fn push_imm8(&mut self, v: u8) -> &mut Self {
        self.b(&[0x6a, v])
    }
    /// push rax
    pub fn push_rax(&mut self) -> &mut Self {
        self.b(&[0x50])
    }
    pub fn iretq(&mut self) -> &mut Self {
        self.b(&[0x48, 0xcf])
    }
    /// mov ax, sel; mov ds, ax (a #GP(sel) for a selector outside the GDT)
    pub fn load_ds(&mut self, sel: u16) -> &mut Self {
        self.b(&[0x66, 0xb8]).b(&sel.to_le_bytes()).b(&[0x8e, 0xd8])
    }

    /// A 64-bit handler for `vector` that records at `RECORDS + vector * 0x100`: +0 vector,
    /// +8 error code, +16 CR2, +24 RSP after popping the error code, +32.. the five frame
    /// slots (RIP, CS, RFLAGS, RSP, SS), +72 count, +80 the handler's CS. Then it either ends
    /// the run (`skip` = None) or adds `skip` to the pushed RIP and returns with iretq.
    pub fn recording_handler(vector: u8, error_code: bool, skip: Option<u8>) -> Vec<u8> {
        let rec = RECORDS + u64::from(vector) * 0x100;
        let mut a = Asm::default();
        if error_code {
            a.b(&[0x58]).store_rax(rec + 8); // pop rax
        }
        a.b(&[0x0f, 0x20, 0xd0]).store_rax(rec + 16); // mov rax, cr2
        a.mov_rax(u64::from(vector)).store_rax(rec);
        a.b(&[0x48, 0x89, 0xe0]).store_rax(rec + 24); // mov rax, rsp
        for i in 0..5u8 {
            a.rax_from_stack(8 * i).store_rax(rec + 32 + 8 * u64::from(i));
        }
        a.b(&[0x8c, 0xc8]).store_rax(rec + 80); // mov eax, cs
                                                // inc qword [abs32]
        a.b(&[0x48, 0xff, 0x04, 0x25]).b(&((rec + 72) as u32).to_le_bytes());
        match skip {
            None => a.done(),
            Some(n) => a.b(&[0x48, 0x83, 0x04, 0x24, n]).iretq(), // add qword [rsp], n
        };
        a.0
    }
}

/// What a recording handler stored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub vector: u64,
    pub error_code: u64,
    pub cr2: u64,
    pub rsp: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub old_rsp: u64,
    pub ss: u64,
    pub count: u64,
    pub handler_cs: u64,
}

pub fn record(ram: &GuestRam, vector: u8) -> Record {
    let at = RECORDS + u64::from(vector) * 0x100;
    let q = |i: u64| ram.read_u64(at + 8 * i).unwrap();
    Record {
        vector: q(0),
        error_code: q(1),
        cr2: q(2),
        rsp: q(3),
        rip: q(4),
        cs: q(5),
        rflags: q(6),
        old_rsp: q(7),
        ss: q(8),
        count: q(9),
        handler_cs: q(10),
    }
}

/// A 64-bit interrupt (type 0xe) or trap (0xf) gate.
pub fn gate64(handler: u64, selector: u16, ist: u8, type_: u8, dpl: u8) -> [u64; 2] {
    let lo = (handler & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (u64::from(0x80 | (dpl << 5) | type_) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

/// A 32-bit interrupt (0xe) or trap (0xf) gate.
pub fn gate32(handler: u32, selector: u16, type_: u8, dpl: u8) -> u64 {
    u64::from(handler & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(0x80 | (dpl << 5) | type_) << 40)
        | (u64::from(handler >> 16) << 48)
}

pub fn set_gate64(ram: &GuestRam, vector: u8, g: [u64; 2]) {
    ram.write_u64(IDT + 16 * u64::from(vector), g[0]).unwrap();
    ram.write_u64(IDT + 16 * u64::from(vector) + 8, g[1]).unwrap();
}

/// A guest in 64-bit long mode at CPL 0 on its own tables: identity map of the 4 MiB of RAM
/// (first 2 MiB in 4 KiB pages), a GDT with kernel/user code and data, a 64-bit TSS, an
/// all-empty IDT at `IDT` (limit 0xfff) for the test to fill.
pub struct Machine {
    pub ram: Arc<GuestRam>,
    pub init: VcpuInit,
}

impl Machine {
    pub fn new() -> Self {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let w = |at: u64, v: u64| ram.write_u64(at, v).unwrap();
        w(PML4, PDPT | 7);
        w(PDPT, PD | 7);
        w(PD, PT | 7);
        w(PD + 8, (2 << 20) | 0x80 | 7);
        for page in 0..512u64 {
            w(PT + 8 * page, (page << 12) | 7);
        }
        let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | ((TSS >> 24) << 56);
        let gdt = [
            0,
            0x0020_9a00_0000_0000, // 0x08 kernel code 64
            0x00cf_9300_0000_ffff, // 0x10 kernel data
            0,                     // 0x18
            0x00cf_f300_0000_ffff, // 0x20 user data
            0x0020_fa00_0000_0000, // 0x28 user code 64
            tss_lo,                // 0x30 TSS
            0,
            0x00cf_9a00_0000_ffff, // 0x40 kernel code 32
            0x00cf_9300_0000_ffff, // 0x48 kernel data 32
        ];
        for (i, d) in gdt.iter().enumerate() {
            w(GDT + 8 * i as u64, *d);
        }
        w(TSS + 4, RSP0);
        w(TSS + 0x24, IST1);
        let seg = |selector: u16| Segment { selector, ..Default::default() };
        let sregs = SpecialRegs {
            cs: seg(KERNEL_CS),
            ds: seg(KERNEL_DS),
            es: seg(KERNEL_DS),
            fs: seg(KERNEL_DS),
            gs: seg(KERNEL_DS),
            ss: seg(KERNEL_DS),
            tr: Segment { selector: TSS_SEL, base: TSS, limit: 0x67, ..Default::default() },
            gdt: DescriptorTable { base: GDT, limit: (8 * gdt.len() - 1) as u16 },
            idt: DescriptorTable { base: IDT, limit: 0xfff },
            cr0: 0x8005_0033,
            cr3: PML4,
            cr4: 0x620,
            efer: 0x500,
            ..Default::default()
        };
        let regs = Regs { rip: CODE, rsp: STACK, rflags: 2, ..Default::default() };
        Self { ram, init: VcpuInit { regs, sregs } }
    }

    pub fn code(&self, at: u64, bytes: &[u8]) {
        self.ram.write(at, bytes).unwrap();
    }

    /// Install a recording handler for `vector` at its slot and a gate to it.
    pub fn record_vector(&self, vector: u8, error_code: bool, skip: Option<u8>, ist: u8) {
        let at = HANDLERS + HANDLER_STRIDE * u64::from(vector);
        self.code(at, &Asm::recording_handler(vector, error_code, skip));
        set_gate64(&self.ram, vector, gate64(at, KERNEL_CS, ist, 0xe, 0));
    }

    pub fn run(&self) -> Run {
        run_vcpu(&self.ram, &self.init)
    }
}

/// The test's VMM side: records hypercalls and answers each with `0x1000 + nr`, except
/// `nr == 9` (CLOCK_PAIRING), answered with the backend's guest TSC. Any port write ends the
/// run; port reads see absent hardware and no device answers MMIO.
#[derive(Default)]
pub struct Sink {
    pub calls: Vec<HypercallExit>,
}

impl InlineExits for Sink {
    fn hypercall(&mut self, call: &HypercallExit, guest_tsc: &mut dyn FnMut() -> u64) -> u64 {
        self.calls.push(*call);
        if call.nr == 9 {
            guest_tsc()
        } else {
            0x1000 + call.nr
        }
    }

    fn port_out(&mut self, _port: u16, _size: u8, _data: u32) -> bool {
        true
    }

    fn port_in(&mut self, _port: u16, _size: u8) -> u32 {
        u32::MAX
    }

    fn mmio_read(&mut self, _gpa: u64, _len: u8) -> Option<u64> {
        None
    }

    fn mmio_write(&mut self, _gpa: u64, _len: u8, _data: u64) -> bool {
        false
    }
}

#[derive(Debug)]
pub struct Run {
    pub exit: VcpuExit,
    pub calls: Vec<HypercallExit>,
}

/// Run one vCPU until its first exit, interrupting it after 20 s.
pub fn run_vcpu(ram: &Arc<GuestRam>, init: &VcpuInit) -> Run {
    let info = GuestInfo { vcpus: 1, entry: init.regs.rip, ..Default::default() };
    let vm = EmuHypervisor::new().create_vm(ram.clone(), &info).unwrap();
    let mut vcpu = vm.create_vcpu(0, init).unwrap();
    let stop = vcpu.interrupter();
    let finished = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let finished = finished.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while !finished.load(Ordering::SeqCst) {
                if start.elapsed() > Duration::from_secs(20) {
                    stop.interrupt();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut sink = Sink::default();
    let exit = vcpu.run(&mut sink).unwrap();
    finished.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    Run { exit, calls: sink.calls }
}

pub const PD32: u64 = 0x8_0000;
pub const IDT32: u64 = 0x9_0000;
pub const IDTR32: u64 = 0x9_1000;
pub const STACK32: u64 = 0x2_8000;
pub const CODE32: u64 = CODE + 0x100;

/// Set up a machine whose guest leaves long mode itself (compat CS, CR0.PG = 0, EFER.LME = 0,
/// its own 32-bit page tables with 4 MiB user pages mapping PA 0..4 MiB at 0 and at 4 MiB,
/// CR0.PG = 1, flat 32-bit DS/ES/SS, ESP = `STACK32`, IDTR = the 8-byte gates at `IDT32`).
/// Returns the 32-bit code so far, to be continued and written at `CODE32`.
pub fn protected_mode(m: &Machine) -> Asm {
    m.ram.write(PD32, &0x87u32.to_le_bytes()).unwrap();
    m.ram.write(PD32 + 4, &0x87u32.to_le_bytes()).unwrap();
    m.ram.write(IDTR32, &0x7ffu16.to_le_bytes()).unwrap();
    m.ram.write(IDTR32 + 2, &(IDT32 as u32).to_le_bytes()).unwrap();
    let mut a = Asm::default();
    a.mov_rbx(0x1_0000_0007); // upper half must not reach a 32-bit caller's arguments
    a.push_imm8(CS32 as u8).mov_rax(CODE32).push_rax().b(&[0x48, 0xcb]); // retfq to CS32
    m.code(CODE, &a.0);
    let mut c = Asm::default();
    c.b(&[0x0f, 0x20, 0xc0, 0x25, 0xff, 0xff, 0xff, 0x7f, 0x0f, 0x22, 0xc0]); // CR0.PG = 0
    c.b(&[0xb9, 0x80, 0, 0, 0xc0, 0x0f, 0x32, 0x25, 0xff, 0xfe, 0xff, 0xff, 0x0f, 0x30]); // LME=0
    c.b(&[0xb8, 0x10, 0, 0, 0, 0x0f, 0x22, 0xe0]); // CR4 = PSE
    c.b(&[0xb8]).b(&(PD32 as u32).to_le_bytes()).b(&[0x0f, 0x22, 0xd8]); // CR3
    c.b(&[0x0f, 0x20, 0xc0, 0x0d, 0, 0, 0, 0x80, 0x0f, 0x22, 0xc0]); // CR0.PG = 1
    c.b(&[0x66, 0xb8, DS32 as u8, 0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0]); // DS, ES, SS
    c.b(&[0xbc]).b(&(STACK32 as u32).to_le_bytes()); // mov esp, STACK32
    c.b(&[0x0f, 0x01, 0x1d]).b(&(IDTR32 as u32).to_le_bytes()); // lidt [IDTR32]
    c
}
