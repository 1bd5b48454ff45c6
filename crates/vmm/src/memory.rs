//! Guest RAM: one anonymous host mapping, and the only gate through which the host touches it.
//!
//! Every access is bounds-checked (with overflow-checked arithmetic) against the RAM size before
//! vm-memory's own volatile copy runs, so a guest-chosen address can never reach host memory
//! outside the guest's RAM.

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileMemory,
};

/// A guest-physical range outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM ({ram_size:#x} bytes)")]
pub struct OutOfBounds {
    /// The first guest-physical address of the access.
    pub gpa: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The guest's RAM size.
    pub ram_size: u64,
}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// An unsupported RAM size (in bytes).
    #[error("guest RAM of {0} bytes is not supported: {min} MiB to {max} GiB, a multiple of {align} MiB",
        min = vmcall_abi::layout::MIN_RAM >> 20, max = vmcall_abi::layout::MAX_RAM >> 30,
        align = vmcall_abi::layout::RAM_ALIGN >> 20)]
    BadSize(u64),
    /// The RAM could not be mapped.
    #[error("cannot map guest RAM")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest RAM mapped at guest-physical 0. A clone is another handle to the same RAM (the
/// mapping lives until its last handle is dropped).
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl GuestRam {
    /// Map `size` bytes of zeroed RAM.
    pub fn new(size: u64) -> Result<Self, RamError> {
        use vmcall_abi::layout::{MAX_RAM, MIN_RAM, RAM_ALIGN};
        if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(RAM_ALIGN) {
            return Err(RamError::BadSize(size));
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(RamError::Mmap)?;
        Ok(Self { mem, size })
    }

    /// `size` bytes (a multiple of 4 KiB) of zeroed memory at guest-physical 0, without the
    /// limits a vmcall VM's RAM has: for raw baselines and tests.
    pub fn anonymous(size: usize) -> Result<Self, RamError> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(RamError::BadSize(size as u64));
        }
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).map_err(RamError::Mmap)?;
        Ok(Self { mem, size: size as u64 })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Check that `gpa..gpa+len` lies inside RAM.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), OutOfBounds> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(OutOfBounds { gpa, len, ram_size: self.size }),
        }
    }

    /// Copy guest bytes at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(gpa, buf.len() as u64)?;
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| self.oob(gpa, buf.len()))
    }

    /// Copy `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), OutOfBounds> {
        self.check(gpa, data.len() as u64)?;
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|_| self.oob(gpa, data.len()))
    }

    /// Read a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, OutOfBounds> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a little-endian u64.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), OutOfBounds> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Replace the bytes at `gpa`, if they are `old`, with `new` (as long as `old`) in one
    /// atomic compare-and-exchange of the naturally aligned 8-byte word around them: another
    /// vCPU fetching or reading them sees either the old bytes or the new ones, never a mix, and
    /// a store another vCPU makes meanwhile to the word's other bytes is kept (the exchange is
    /// retried on the word as it then is). Returns false, and writes nothing, when the bytes at
    /// `gpa` are not `old` (someone changed them since the caller looked) or when
    /// `gpa..gpa+len` does not lie inside one aligned word.
    pub fn replace_in_one_store(
        &self,
        gpa: u64,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, OutOfBounds> {
        assert_eq!(old.len(), new.len(), "replace_in_one_store: old and new differ in length");
        let word = gpa & !7;
        let shift = (gpa - word) as usize;
        let range = shift..shift + new.len();
        if new.is_empty() || range.end > 8 {
            return Ok(false);
        }
        self.check(word, 8)?;
        let oob = self.oob(word, 8);
        let slice = self.mem.get_slice(GuestAddress(word), 8).map_err(|_| oob)?;
        // An aligned word inside RAM (checked above): vm-memory hands out an atomic view of it.
        let cell = slice.get_atomic_ref::<std::sync::atomic::AtomicU64>(0).map_err(|_| oob)?;
        let mut current = cell.load(std::sync::atomic::Ordering::Acquire);
        loop {
            let mut bytes = current.to_le_bytes();
            if bytes[range.clone()] != *old {
                return Ok(false);
            }
            bytes[range.clone()].copy_from_slice(new);
            match cell.compare_exchange_weak(
                current,
                u64::from_le_bytes(bytes),
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            ) {
                Ok(_) => return Ok(true),
                Err(now) => current = now,
            }
        }
    }

    /// Fill `gpa..gpa+len` with zeroes.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), OutOfBounds> {
        self.check(gpa, len)?;
        const CHUNK: [u8; 4096] = [0; 4096];
        let mut at = gpa;
        while at < gpa + len {
            let n = (gpa + len - at).min(CHUNK.len() as u64);
            self.write(at, &CHUNK[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// A checked view of `gpa..gpa+len`, for many small accesses inside it at the cost of one
    /// bounds check (a batch of hypercalls).
    pub fn view(&self, gpa: u64, len: u64) -> Result<RamView<'_>, OutOfBounds> {
        self.check(gpa, len)?;
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), len as usize)
            .map_err(|_| self.oob(gpa, len as usize))?;
        Ok(RamView { slice, gpa, ram_size: self.size })
    }

    /// Host address of guest-physical 0 and the RAM length, for a backend that maps RAM into a
    /// hypervisor or emulator. The pointer stays valid as long as `self` lives.
    pub fn host_mapping(&self) -> (*mut u8, usize) {
        let ptr = self
            .mem
            .find_region(GuestAddress(0))
            .and_then(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
            .expect("RAM is one region starting at guest-physical 0");
        (ptr, self.size as usize)
    }

    fn oob(&self, gpa: u64, len: usize) -> OutOfBounds {
        OutOfBounds { gpa, len: len as u64, ram_size: self.size }
    }
}

/// A bounds-checked window of guest RAM (see [`GuestRam::view`]); offsets are relative to
/// its start and checked against its length.
#[derive(Debug)]
pub struct RamView<'a> {
    slice: vm_memory::VolatileSlice<'a, ()>,
    gpa: u64,
    ram_size: u64,
}

impl RamView<'_> {
    fn oob(&self, off: usize, len: usize) -> OutOfBounds {
        OutOfBounds {
            gpa: self.gpa.wrapping_add(off as u64),
            len: len as u64,
            ram_size: self.ram_size,
        }
    }

    /// Copy bytes at `off` into `buf`.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.slice.read_slice(buf, off).map_err(|_| self.oob(off, buf.len()))
    }

    /// Copy `data` to `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        self.slice.write_slice(data, off).map_err(|_| self.oob(off, data.len()))
    }

    /// Write a little-endian u64 at `off`.
    pub fn write_u64(&self, off: usize, value: u64) -> Result<(), OutOfBounds> {
        self.slice.write_obj(value.to_le(), off).map_err(|_| self.oob(off, 8))
    }

    /// The `n` little-endian u64 words at `off` (any alignment), checked once: then each
    /// word is read or written with one volatile access (a batch's entries).
    pub fn words(&self, off: usize, n: usize) -> Result<RamWords<'_>, OutOfBounds> {
        let len = n.saturating_mul(8);
        self.slice.get_array_ref::<u64>(off, n).map(RamWords).map_err(|_| self.oob(off, len))
    }
}

/// Little-endian u64 words inside a [`RamView`] (see [`RamView::words`]); indices are checked
/// against its length.
#[derive(Debug)]
pub struct RamWords<'a>(vm_memory::volatile_memory::VolatileArrayRef<'a, u64, ()>);

impl RamWords<'_> {
    /// Number of words.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// Word `i`. Panics if `i >= len()`.
    #[inline]
    pub fn load(&self, i: usize) -> u64 {
        u64::from_le(self.0.load(i))
    }

    /// Set word `i`. Panics if `i >= len()`.
    #[inline]
    pub fn store(&self, i: usize, value: u64) {
        self.0.store(i, value.to_le())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounded() {
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.write_u64(0x1000, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(ram.read_u64(0x1000).unwrap(), 0x1122_3344_5566_7788);
        let end = ram.size();
        assert!(ram.write_u64(end - 8, 1).is_ok());
        assert_eq!(
            ram.write_u64(end - 7, 1),
            Err(OutOfBounds { gpa: end - 7, len: 8, ram_size: end })
        );
        assert!(ram.read_u64(u64::MAX - 3).is_err(), "address overflow must not wrap");
        let mut big = vec![0u8; 16];
        assert!(ram.read(end, &mut big).is_err());
    }

    #[test]
    fn views_are_bounded_too() {
        let ram = GuestRam::new(2 << 20).unwrap();
        assert!(ram.view(ram.size() - 8, 16).is_err());
        let v = ram.view(0x1000, 16).unwrap();
        v.write_u64(8, 0xabcd).unwrap();
        assert_eq!(ram.read_u64(0x1008).unwrap(), 0xabcd);
        assert!(v.write_u64(9, 1).is_err(), "past the view's end");
        let mut b = [0u8; 16];
        v.read(0, &mut b).unwrap();
        assert_eq!(b[8], 0xcd);
        assert!(v.read(1, &mut b).is_err());
        assert!(v.words(1, 2).is_err(), "past the view's end");
        let w = v.words(1, 1).unwrap();
        w.store(0, 0x1122_3344_5566_7788);
        let mut b = [0u8; 9];
        v.read(0, &mut b).unwrap();
        assert_eq!(&b[1..9], &0x1122_3344_5566_7788u64.to_le_bytes(), "unaligned, little-endian");
        assert_eq!((w.len(), w.load(0)), (1, 0x1122_3344_5566_7788));
    }

    #[test]
    fn single_store_replacements_stay_inside_one_word_and_only_replace_what_was_expected() {
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.write_u64(0x1000, 0x8877_6655_4433_2211).unwrap();
        assert_eq!(
            ram.replace_in_one_store(0x1003, &[0x44, 0x55, 0x66], &[0xaa, 0xbb, 0xcc]),
            Ok(true)
        );
        assert_eq!(ram.read_u64(0x1000).unwrap(), 0x8877_ccbb_aa33_2211);
        // The bytes are no longer what the caller saw: nothing written.
        assert_eq!(ram.replace_in_one_store(0x1003, &[0x44, 0x55, 0x66], &[1, 2, 3]), Ok(false));
        assert_eq!(ram.read_u64(0x1000).unwrap(), 0x8877_ccbb_aa33_2211);
        assert_eq!(
            ram.replace_in_one_store(0x1006, &[0, 0, 0], &[1, 2, 3]),
            Ok(false),
            "straddles two words"
        );
        assert_eq!(ram.read_u64(0x1008).unwrap(), 0);
        assert!(ram.replace_in_one_store(ram.size() - 2, &[0], &[1]).is_ok());
        assert!(ram.replace_in_one_store(ram.size(), &[0], &[1]).is_err());
    }

    /// Another thread storing to the rest of the word while replacements run: none of its
    /// stores is lost, and every replacement lands.
    #[test]
    fn single_store_replacements_keep_concurrent_stores_to_the_same_word() {
        let ram = std::sync::Arc::new(GuestRam::new(2 << 20).unwrap());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (ram, done) = (ram.clone(), done.clone());
            std::thread::spawn(move || {
                // Bytes 3..7 of the word: a counter the replacements must never roll back.
                let slice = ram.mem.get_slice(GuestAddress(0x1000), 8).unwrap();
                let cell = slice.get_atomic_ref::<std::sync::atomic::AtomicU64>(0).unwrap();
                let (mut n, mut rolled_back) = (0u64, 0u32);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let w = cell.load(std::sync::atomic::Ordering::Acquire);
                    if (w >> 24) & 0xff_ffff_ffff != n {
                        rolled_back += 1;
                    }
                    n += 1;
                    let next = (w & 0xff_ffff) | (n << 24);
                    if cell
                        .compare_exchange(
                            w,
                            next,
                            std::sync::atomic::Ordering::AcqRel,
                            std::sync::atomic::Ordering::Acquire,
                        )
                        .is_err()
                    {
                        n -= 1; // a replacement came in between: try again on the new word
                    }
                }
                (n, rolled_back)
            })
        };
        // Replace while the other thread stores: from its first store until it has made a
        // thousand (and at least 20,000 replacements), whatever the scheduler does.
        let stored = || ram.read_u64(0x1000).unwrap() >> 24;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while stored() == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let mut last = 0u8;
        let mut i = 0u32;
        while (i < 20_000 || stored() < 1000) && std::time::Instant::now() < deadline {
            let next = (i % 251) as u8 + 1;
            assert_eq!(ram.replace_in_one_store(0x1000, &[last], &[next]), Ok(true));
            last = next;
            i += 1;
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (n, rolled_back) = writer.join().unwrap();
        assert!(n >= 1000, "the other thread stored {n} times while the replacements ran");
        assert_eq!(rolled_back, 0, "stores of the other thread were lost");
        let w = ram.read_u64(0x1000).unwrap();
        assert_eq!((w >> 24) & 0xff_ffff_ffff, n, "the other thread's last store is there");
        assert_eq!(w as u8, last, "and so is the last replacement");
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestRam::new(0), Err(RamError::BadSize(0))));
        assert!(matches!(GuestRam::new((2 << 20) + 4096), Err(RamError::BadSize(_))));
        assert!(matches!(GuestRam::new(1 << 40), Err(RamError::BadSize(_))));
    }
}
