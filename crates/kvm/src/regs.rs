//! Conversions between KVM's register structs and vmcall's backend-neutral ones.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vmcall_vmm::x86::{PagingContext, Regs, Segment, SpecialRegs};

/// The registers that say how the guest translates addresses, from KVM's sregs.
pub(crate) fn paging_context(s: &kvm_sregs) -> PagingContext {
    PagingContext { cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer }
}

/// Build `$ty` from `$from` field by field (the two register structs share field names).
macro_rules! copy_fields {
    ($from:expr, $ty:ident { $($f:ident),* $(,)? }) => {
        $ty { $($f: $from.$f),* }
    };
}

macro_rules! gprs {
    ($from:expr, $ty:ident) => {
        copy_fields!(
            $from,
            $ty {
                rax,
                rbx,
                rcx,
                rdx,
                rsi,
                rdi,
                rsp,
                rbp,
                r8,
                r9,
                r10,
                r11,
                r12,
                r13,
                r14,
                r15,
                rip,
                rflags
            }
        )
    };
}

pub(crate) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    gprs!(r, kvm_regs)
}

pub(crate) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    gprs!(r, Regs)
}

pub(crate) fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

pub(crate) fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

/// Apply vmcall's special registers on top of the vCPU's current ones.
pub(crate) fn apply_sregs(k: &mut kvm_sregs, s: &SpecialRegs) {
    k.cs = segment_to_kvm(&s.cs);
    k.ds = segment_to_kvm(&s.ds);
    k.es = segment_to_kvm(&s.es);
    k.fs = segment_to_kvm(&s.fs);
    k.gs = segment_to_kvm(&s.gs);
    k.ss = segment_to_kvm(&s.ss);
    k.tr = segment_to_kvm(&s.tr);
    k.ldt = segment_to_kvm(&s.ldt);
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.efer = s.efer;
}

/// vmcall's special registers from KVM's.
pub(crate) fn sregs_from_kvm(k: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: segment_from_kvm(&k.cs),
        ds: segment_from_kvm(&k.ds),
        es: segment_from_kvm(&k.es),
        fs: segment_from_kvm(&k.fs),
        gs: segment_from_kvm(&k.gs),
        ss: segment_from_kvm(&k.ss),
        tr: segment_from_kvm(&k.tr),
        ldt: segment_from_kvm(&k.ldt),
        gdt: vmcall_vmm::x86::DescriptorTable { base: k.gdt.base, limit: k.gdt.limit },
        idt: vmcall_vmm::x86::DescriptorTable { base: k.idt.base, limit: k.idt.limit },
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        efer: k.efer,
    }
}
