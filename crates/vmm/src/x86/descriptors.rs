//! Descriptor tables and exceptions: GDT code-segment lookup, exception frames, vector names.

use super::paging::{VirtError, VirtualMemory};
use super::regs::{DescriptorTable, Segment};

/// Exceptions that push an error code.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// #UD: what a hypercall instruction raises when the kernel does not handle it.
pub const UD_VECTOR: u8 = 6;
/// #GP: what some KVMs' instruction emulators raise for a hypercall instruction at CPL > 0.
pub const GP_VECTOR: u8 = 13;

/// An exception frame as the CPU leaves it on the handler's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapFrame {
    /// The exception vector.
    pub vector: u8,
    /// The error code, for the vectors that push one.
    pub error_code: Option<u64>,
    /// RIP the exception returns to.
    pub rip: u64,
    /// CS the exception returns to.
    pub cs: u16,
    /// RFLAGS at the exception.
    pub rflags: u64,
    /// The interrupted code's stack: always saved by a 64-bit gate, by a 32-bit gate only on
    /// a privilege change.
    pub stack: Option<(u64, u16)>,
    /// Guest-virtual address of the frame's RIP slot (where a resume address is written).
    pub rip_slot: u64,
    /// Guest-virtual address just past the frame: the interrupted code's stack pointer when
    /// the frame holds none.
    pub end: u64,
}

/// The frame of `vector` at the handler's `rsp`: 8-byte slots from a 64-bit IDT (`long`),
/// 4-byte slots from a 32-bit one, where SS:ESP is there only if the handler runs at another
/// privilege level (`handler_cpl`) than the interrupted code.
pub fn read_trap_frame(
    mem: &VirtualMemory<'_>,
    rsp: u64,
    vector: u8,
    long: bool,
    handler_cpl: u8,
) -> Result<TrapFrame, VirtError> {
    let slot = if long { 8 } else { 4 };
    let read = |at: u64| -> Result<u64, VirtError> {
        let mut b = [0u8; 8];
        mem.read(at, &mut b[..slot as usize])?;
        Ok(u64::from_le_bytes(b))
    };
    let (error_code, at) = if has_error_code(vector) {
        (Some(read(rsp)?), rsp.wrapping_add(slot))
    } else {
        (None, rsp)
    };
    // The guest chose RSP: a frame may wrap around the top of the address space (the reads
    // then fail or succeed as the guest's tables say), never overflow the host's arithmetic.
    let slot_at = |n: u64| at.wrapping_add(n * slot);
    let cs = read(slot_at(1))? as u16;
    let rflags = read(slot_at(2))?;
    let stack = if long || u8::try_from(cs & 3).is_ok_and(|cpl| cpl != handler_cpl) {
        Some((read(slot_at(3))?, read(slot_at(4))? as u16))
    } else {
        None
    };
    let end = slot_at(if stack.is_some() { 5 } else { 3 });
    Ok(TrapFrame { vector, error_code, rip: read(at)?, cs, rflags, stack, rip_slot: at, end })
}

/// The segment a selector names in the GDT at `gdt` (a guest-virtual base): base, limit,
/// type, privilege and mode bits, as loading it into a segment register would cache them.
pub fn code_segment(
    mem: &VirtualMemory<'_>,
    gdt: DescriptorTable,
    selector: u16,
) -> Option<Segment> {
    let index = u64::from(selector & !7);
    if selector & 4 != 0 || index == 0 || index + 7 > u64::from(gdt.limit) {
        return None;
    }
    let d = mem.read_u64(gdt.base.wrapping_add(index)).ok()?;
    let g = d & (1 << 55) != 0;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    Some(Segment {
        selector,
        limit: if g { (raw_limit << 12) | 0xfff } else { raw_limit },
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        type_: ((d >> 40) & 0xf) as u8,
        present: d & (1 << 47) != 0,
        dpl: ((d >> 45) & 3) as u8,
        s: d & (1 << 44) != 0,
        l: d & (1 << 53) != 0,
        db: d & (1 << 54) != 0,
        g,
        avl: d & (1 << 52) != 0,
        unusable: false,
    })
}

/// The handler an IDT gate points at: its linear address and code selector, or `None` for a
/// gate that is absent, outside the IDT's limit, or not an interrupt or trap gate. `long`
/// selects 16-byte long-mode gates over 8-byte protected-mode ones.
pub fn idt_gate(
    mem: &VirtualMemory<'_>,
    idt: DescriptorTable,
    vector: u8,
    long: bool,
) -> Option<(u64, u16)> {
    let size = if long { 16 } else { 8 };
    let at = u64::from(vector) * size;
    if at + size - 1 > u64::from(idt.limit) {
        return None;
    }
    let low = mem.read_u64(idt.base.wrapping_add(at)).ok()?;
    let kind = (low >> 40) & 0x1f;
    // Present, and a 32/64-bit interrupt (0xe) or trap (0xf) gate.
    if low & (1 << 47) == 0 || !(kind == 0xe || kind == 0xf) {
        return None;
    }
    let mut offset = (low & 0xffff) | ((low >> 32) & 0xffff_0000);
    if long {
        let high = mem.read_u64(idt.base.wrapping_add(at + 8)).ok()?;
        offset |= (high & 0xffff_ffff) << 32;
    }
    Some((offset, ((low >> 16) & 0xffff) as u16))
}

/// Human name of an exception vector.
pub fn exception_name(vector: u8) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization",
        "#CP control protection",
    ];
    NAMES.get(usize::from(vector)).copied().unwrap_or("exception")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::x86::PagingContext;

    fn flat(ram: &GuestRam) -> VirtualMemory<'_> {
        VirtualMemory::new(ram, PagingContext { cr0: 1, ..Default::default() })
    }

    #[test]
    fn trap_frames_in_both_widths() {
        let ram = GuestRam::new(2 << 20).unwrap();
        for (i, v) in [0xe_u64, 0x1234, 0x8, 0x246, 0x9000, 0x10].iter().enumerate() {
            ram.write_u64(0x5_0000 + 8 * i as u64, *v).unwrap();
        }
        let m = flat(&ram);
        let f = read_trap_frame(&m, 0x5_0000, 14, true, 0).unwrap();
        assert_eq!(
            (f.error_code, f.rip, f.cs, f.stack),
            (Some(0xe), 0x1234, 8, Some((0x9000, 0x10)))
        );
        let f = read_trap_frame(&m, 0x5_0000, 6, true, 0).unwrap();
        assert_eq!((f.error_code, f.rip, f.rip_slot, f.end), (None, 0xe, 0x5_0000, 0x5_0028));
        // 32-bit: EIP, CS, EFLAGS, and ESP/SS only from another privilege level.
        for (i, v) in [0x1000u32, 0x1b, 0x202, 0x8000, 0x23].iter().enumerate() {
            ram.write(0x6_0000 + 4 * i as u64, &v.to_le_bytes()).unwrap();
        }
        let f = read_trap_frame(&m, 0x6_0000, 6, false, 0).unwrap();
        assert_eq!((f.rip, f.cs, f.rflags, f.stack), (0x1000, 0x1b, 0x202, Some((0x8000, 0x23))));
        ram.write(0x6_0004, &0x08u32.to_le_bytes()).unwrap();
        let f = read_trap_frame(&m, 0x6_0000, 6, false, 0).unwrap();
        assert_eq!((f.stack, f.end), (None, 0x6_000c));
    }

    /// Found by the `descriptors` fuzz target: a frame at the top of the address space
    /// overflowed the slot arithmetic (a panic in debug builds, on the vCPU thread).
    #[test]
    fn frames_that_wrap_around_the_address_space_are_read_without_overflow() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = flat(&ram);
        for rsp in [u64::MAX, u64::MAX - 7, u64::MAX - 15] {
            for vector in [6, 14] {
                for long in [true, false] {
                    let _ = read_trap_frame(&m, rsp, vector, long, 0);
                }
            }
        }
        // With paging off the frame's first slot is at 0xffff_fff8, outside RAM: an error.
        assert!(read_trap_frame(&m, u64::MAX - 7, 6, true, 0).is_err());
    }

    #[test]
    fn gates_and_segments() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = flat(&ram);
        // 64-bit interrupt gate for vector 6 at 0x1_2345_6789_abcd, selector 8.
        let idt = DescriptorTable { base: 0x2000, limit: 16 * 32 - 1 };
        ram.write_u64(0x2000 + 96, 0xabcd | (8 << 16) | (0x8e << 40) | (0x6789 << 48)).unwrap();
        ram.write_u64(0x2000 + 104, 0x1_2345).unwrap();
        assert_eq!(idt_gate(&m, idt, 6, true), Some((0x1_2345_6789_abcd, 8)));
        assert_eq!(idt_gate(&m, idt, 7, true), None, "not present");
        assert_eq!(idt_gate(&m, DescriptorTable { limit: 100, ..idt }, 6, true), None);
        // 32-bit trap gate for vector 13.
        let idt32 = DescriptorTable { base: 0x3000, limit: 8 * 32 - 1 };
        ram.write_u64(0x3000 + 8 * 13, 0x5678 | (0x10 << 16) | (0x8f << 40) | (0x1234 << 48))
            .unwrap();
        assert_eq!(idt_gate(&m, idt32, 13, false), Some((0x1234_5678, 0x10)));
        // A 32-bit code segment based at 0x0100_0000.
        let gdt = DescriptorTable { base: 0x4000, limit: 0x17 };
        ram.write_u64(0x4010, 0x01cf_9a00_0000_ffff).unwrap();
        let cs = code_segment(&m, gdt, 0x10).unwrap();
        assert_eq!((cs.base, cs.db, cs.l, cs.dpl, cs.present), (0x0100_0000, true, false, 0, true));
        assert_eq!((cs.limit, cs.type_, cs.s), (0xffff_ffff, 0xa, true));
        assert!(code_segment(&m, gdt, 0x18).is_none(), "past the limit");
    }
}
