//! Exception frames, GDT code segments and IDT gates read from random guest memory through
//! random paging state, and the decision a trap site makes from them (the mode of the
//! interrupted code, the linear address of its RIP, whether a hypercall instruction is there),
//! as the KVM backend makes it for a #UD or #GP its stub reported.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmcall_fuzz::{fill_chunks, fill_tables, fresh_ram, gpa, paging, virt_addr};
use vmcall_vmm::x86::descriptors::{
    code_segment, exception_name, has_error_code, idt_gate, read_trap_frame,
};
use vmcall_vmm::x86::{CpuMode, DescriptorTable, VirtualMemory};

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let ram = fresh_ram();
    let ctx = paging(&mut u, &ram)?;
    fill_tables(&mut u, &ram, 16)?;
    fill_chunks(&mut u, &ram, 8)?;
    let mem = VirtualMemory::new(&ram, ctx);
    for _ in 0..u.int_in_range(1..=4)? {
        let vector: u8 =
            if u.ratio(3, 4)? { *u.choose(&[6, 13, 14, 8, 3])? } else { u.arbitrary()? };
        let _ = exception_name(vector);
        let long: bool = u.arbitrary()?;
        let table = DescriptorTable {
            base: if u.arbitrary()? { gpa(&mut u)? } else { virt_addr(&mut u)? },
            limit: u.arbitrary()?,
        };
        if let Some((offset, selector)) = idt_gate(&mem, table, vector, long) {
            assert!(long || offset <= u64::from(u32::MAX), "a 32-bit gate with a 64-bit offset");
            let _ = selector;
        }
        let rsp = if u.arbitrary()? { gpa(&mut u)? } else { virt_addr(&mut u)? };
        let handler_cpl = u.int_in_range(0..=3)?;
        let Ok(frame) = read_trap_frame(&mem, rsp, vector, long, handler_cpl) else { continue };
        assert_eq!(frame.error_code.is_some(), has_error_code(vector));
        assert_eq!(frame.stack.is_some(), long || (frame.cs & 3) as u8 != handler_cpl);
        if !long {
            assert!(frame.rip <= u64::from(u32::MAX) && frame.rflags <= u64::from(u32::MAX));
        }
        // What the trap site does next: the caller's code segment, its mode, its linear RIP
        // and the bytes there.
        let gdt = DescriptorTable {
            base: table.base ^ u64::from(u.arbitrary::<u16>()?),
            limit: u.arbitrary()?,
        };
        let Some(cs) = code_segment(&mem, gdt, frame.cs) else { continue };
        assert_eq!(cs.selector, frame.cs);
        assert!(cs.dpl <= 3 && cs.type_ <= 0xf);
        let (efer, cr0) = (ctx.efer ^ u.arbitrary::<u64>()? & 0x500, ctx.cr0 | 1);
        let mode = CpuMode::from_cs(&cs, efer, cr0);
        let rip =
            if mode.is_64bit() { frame.rip } else { cs.base.wrapping_add(frame.rip) & 0xffff_ffff };
        let mut bytes = [0u8; 3];
        if mem.read(rip, &mut bytes).is_ok() && vmcall_abi::insn::is_hypercall(&bytes) {
            let _resume = frame.rip.wrapping_add(vmcall_abi::insn::HYPERCALL_LEN);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
