//! Descriptor tables and exceptions: GDT code-segment lookup, exception frames, vector names.

use super::regs::{DescriptorTable, Segment};
use crate::memory::{GuestRam, OutOfBounds};

/// Exceptions that push an error code.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// #UD: what a hypercall instruction raises when the kernel does not handle it.
pub const UD_VECTOR: u8 = 6;
/// #GP: what some KVMs' instruction emulators raise for a hypercall instruction at CPL > 0.
pub const GP_VECTOR: u8 = 13;

/// An exception frame as the VMM's stubs leave it on the exception stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapFrame {
    pub vector: u8,
    pub error_code: Option<u64>,
    pub rip: u64,
    pub cs: u16,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u16,
    /// Guest-physical address of the frame's RIP slot (where a resume address is written).
    pub rip_slot: u64,
}

/// Read the frame of `vector` at the stub's RSP.
pub fn read_trap_frame(ram: &GuestRam, rsp: u64, vector: u8) -> Result<TrapFrame, OutOfBounds> {
    let (error_code, at) =
        if has_error_code(vector) { (Some(ram.read_u64(rsp)?), rsp + 8) } else { (None, rsp) };
    Ok(TrapFrame {
        vector,
        error_code,
        rip: ram.read_u64(at)?,
        cs: ram.read_u64(at + 8)? as u16,
        rflags: ram.read_u64(at + 16)?,
        rsp: ram.read_u64(at + 24)?,
        ss: ram.read_u64(at + 32)? as u16,
        rip_slot: at,
    })
}

/// The code segment a selector names in the GDT at `gdt`, as far as mode and privilege go.
pub fn code_segment(ram: &GuestRam, gdt: DescriptorTable, selector: u16) -> Option<Segment> {
    let index = u64::from(selector & !7);
    if selector & 4 != 0 || index == 0 || index + 7 > u64::from(gdt.limit) {
        return None;
    }
    let d = ram.read_u64(gdt.base + index).ok()?;
    Some(Segment {
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: d & (1 << 47) != 0,
        dpl: ((d >> 45) & 3) as u8,
        s: d & (1 << 44) != 0,
        l: d & (1 << 53) != 0,
        db: d & (1 << 54) != 0,
        g: d & (1 << 55) != 0,
        ..Default::default()
    })
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

    #[test]
    fn trap_frames_skip_error_codes() {
        let ram = GuestRam::new(2 << 20).unwrap();
        for (i, v) in [0xe_u64, 0x1234, 0x8, 0x246, 0x9000, 0x10].iter().enumerate() {
            ram.write_u64(0x5_0000 + 8 * i as u64, *v).unwrap();
        }
        let f = read_trap_frame(&ram, 0x5_0000, 14).unwrap();
        assert_eq!((f.error_code, f.rip, f.cs), (Some(0xe), 0x1234, 8));
        let f = read_trap_frame(&ram, 0x5_0000, 6).unwrap();
        assert_eq!((f.error_code, f.rip, f.rip_slot), (None, 0xe, 0x5_0000));
    }
}
