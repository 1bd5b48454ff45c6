//! A local APIC's register page in xAPIC mode (at `mmio::APIC_BASE`), one per vCPU: what a
//! kernel reads and programs while it brings up its CPU — ID, version, TPR/PPR, EOI, LDR/DFR,
//! spurious vector, ICR, the LVT entries and the timer. vmcall has no interrupt delivery, so
//! nothing programmed here ever fires: the timer counts down (on a 1 GHz bus clock, as KVM's)
//! and an IPI written to the ICR reports itself delivered, but no vector is raised.

use std::time::Instant;

const ID: u64 = 0x020;
const VERSION: u64 = 0x030;
const TPR: u64 = 0x080;
const PPR: u64 = 0x0a0;
const LDR: u64 = 0x0d0;
const DFR: u64 = 0x0e0;
const SVR: u64 = 0x0f0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const LVT_LAST: u64 = 0x370;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3e0;
const LVT_CMCI: u64 = 0x2f0;

/// Version 0x14 (an integrated APIC), 6 LVT entries (max LVT index 5).
const VERSION_VALUE: u32 = 0x0005_0014;
/// An LVT entry's mask bit: every entry starts masked.
const LVT_MASKED: u32 = 1 << 16;
/// The timer's mode bits in its LVT entry: 0 one-shot, 1 periodic.
const TIMER_PERIODIC: u32 = 1 << 17;

/// One vCPU's APIC registers.
#[derive(Debug, Clone)]
pub struct Apic {
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    icr: [u32; 2],
    /// LVT CMCI, then timer, thermal, performance, LINT0, LINT1, error (0x2f0, 0x320..=0x370).
    lvt: [u32; 7],
    timer_initial: u32,
    timer_divide: u32,
    timer_start: Instant,
}

impl Apic {
    /// The APIC of vCPU `id` after reset.
    pub fn new(id: u32) -> Self {
        Self {
            id: id << 24,
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xff,
            icr: [0; 2],
            lvt: [LVT_MASKED; 7],
            timer_initial: 0,
            timer_divide: 0,
            timer_start: Instant::now(),
        }
    }

    fn lvt_index(reg: u64) -> Option<usize> {
        match reg {
            LVT_CMCI => Some(0),
            LVT_TIMER..=LVT_LAST if reg.is_multiple_of(0x10) => {
                Some(1 + ((reg - LVT_TIMER) / 0x10) as usize)
            }
            _ => None,
        }
    }

    /// The timer's divisor, from the divide configuration register (bits 0, 1 and 3).
    fn divisor(&self) -> u64 {
        let code = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    fn timer_current(&self) -> u32 {
        if self.timer_initial == 0 {
            return 0;
        }
        let initial = u64::from(self.timer_initial);
        let ticks = self.timer_start.elapsed().as_nanos() as u64 / self.divisor();
        let left = if self.lvt[1] & TIMER_PERIODIC != 0 {
            initial - ticks % initial
        } else {
            initial.saturating_sub(ticks)
        };
        left as u32
    }

    /// The 32-bit register at `reg` (a 16-byte aligned offset in the page).
    fn register(&self, reg: u64) -> u32 {
        if let Some(i) = Self::lvt_index(reg) {
            return self.lvt[i];
        }
        match reg {
            ID => self.id,
            VERSION => VERSION_VALUE,
            TPR | PPR => self.tpr,
            LDR => self.ldr,
            DFR => self.dfr,
            SVR => self.svr,
            // Delivery status (bit 12) always idle: the IPI "was sent".
            ICR_LOW => self.icr[0] & !(1 << 12),
            ICR_HIGH => self.icr[1],
            TIMER_INITIAL => self.timer_initial,
            TIMER_CURRENT => self.timer_current(),
            TIMER_DIVIDE => self.timer_divide,
            // EOI, ESR, ISR/TMR/IRR and reserved registers read 0.
            _ => 0,
        }
    }

    /// A read of `len` bytes at `offset` in the page.
    pub fn read(&self, offset: u64, len: u8) -> u64 {
        let value = u64::from(self.register(offset & !0xf));
        let shifted = value >> (8 * (offset & 3));
        if len >= 4 {
            shifted
        } else {
            shifted & ((1 << (8 * u32::from(len))) - 1)
        }
    }

    /// A write of `value` at `offset` (registers are 32 bits; narrower writes are taken as
    /// written to the low bytes).
    pub fn write(&mut self, offset: u64, value: u64) {
        let reg = offset & !0xf;
        let v = value as u32;
        if let Some(i) = Self::lvt_index(reg) {
            self.lvt[i] = v;
            return;
        }
        match reg {
            ID => self.id = v & 0xff00_0000,
            TPR => self.tpr = v & 0xff,
            LDR => self.ldr = v & 0xff00_0000,
            DFR => self.dfr = v | 0x0fff_ffff,
            SVR => self.svr = v & 0x13ff,
            ICR_LOW => self.icr[0] = v,
            ICR_HIGH => self.icr[1] = v & 0xff00_0000,
            TIMER_INITIAL => {
                self.timer_initial = v;
                self.timer_start = Instant::now();
            }
            TIMER_DIVIDE => self.timer_divide = v & 0xb,
            // EOI and ESR writes are accepted and change nothing here; read-only and reserved
            // registers ignore writes.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_values_and_read_write_registers() {
        let mut a = Apic::new(3);
        assert_eq!(a.read(ID, 4), 3 << 24);
        assert_eq!(a.read(VERSION, 4), 0x0005_0014);
        assert_eq!(a.read(SVR, 4), 0xff);
        assert_eq!(a.read(DFR, 4), 0xffff_ffff);
        assert_eq!(a.read(LVT_TIMER, 4), 1 << 16, "masked at reset");
        a.write(SVR, 0x1ff);
        a.write(TPR, 0x20);
        a.write(LDR, 0x0100_0000);
        a.write(0x350, 0x700); // LINT0: ExtINT
        assert_eq!((a.read(SVR, 4), a.read(TPR, 4), a.read(PPR, 4)), (0x1ff, 0x20, 0x20));
        assert_eq!((a.read(LDR, 4), a.read(0x350, 4)), (0x0100_0000, 0x700));
        a.write(ICR_HIGH, 0x0200_0000);
        a.write(ICR_LOW, 0x4500 | (1 << 12));
        assert_eq!((a.read(ICR_LOW, 4), a.read(ICR_HIGH, 4)), (0x4500, 0x0200_0000));
        assert_eq!(a.read(0xb0, 4), 0, "EOI reads 0");
        assert_eq!(a.read(ID + 3, 1), 3, "byte reads");
    }

    #[test]
    fn the_timer_counts_down_once_or_periodically() {
        let mut a = Apic::new(0);
        assert_eq!(a.read(TIMER_CURRENT, 4), 0, "stopped");
        a.write(TIMER_DIVIDE, 0xb); // divide by 1
        assert_eq!(a.divisor(), 1);
        a.write(TIMER_INITIAL, 1_000_000_000);
        let c = a.read(TIMER_CURRENT, 4);
        assert!(c > 0 && c <= 1_000_000_000, "{c}");
        a.write(TIMER_INITIAL, 10);
        std::thread::sleep(std::time::Duration::from_micros(50));
        assert_eq!(a.read(TIMER_CURRENT, 4), 0, "one-shot ran out");
        a.write(LVT_TIMER, u64::from(TIMER_PERIODIC));
        assert!(a.read(TIMER_CURRENT, 4) >= 1, "periodic wraps");
        a.write(TIMER_DIVIDE, 0x3); // divide by 16
        assert_eq!(a.divisor(), 16);
    }
}
