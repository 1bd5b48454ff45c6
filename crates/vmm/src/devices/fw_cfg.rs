//! QEMU's fw_cfg device, the way test kernels ask their machine how many CPUs it has: a 16-bit
//! selector register and an 8-bit data register that reads the selected item byte by byte.
//! Only the traditional port interface (no DMA) and the items kernels read are provided.

/// Item keys (QEMU's `FW_CFG_*`).
pub const SIGNATURE: u16 = 0x0000;
/// fw_cfg item: the "QEMU" signature.
pub const ID: u16 = 0x0001;
/// fw_cfg item: RAM size in bytes.
pub const RAM_SIZE: u16 = 0x0003;
/// fw_cfg item: number of CPUs.
pub const NB_CPUS: u16 = 0x0005;
/// fw_cfg item: most CPUs.
pub const MAX_CPUS: u16 = 0x000f;
/// fw_cfg item: the file directory (empty here).
pub const FILE_DIR: u16 = 0x0019;

/// The selected item and how far it has been read.
#[derive(Debug, Clone, Default)]
pub struct FwCfg {
    vcpus: u16,
    ram_size: u64,
    item: Vec<u8>,
    at: usize,
}

impl FwCfg {
    /// The device for a VM with `vcpus` vCPUs and `ram_size` bytes of RAM.
    pub fn new(vcpus: u32, ram_size: u64) -> Self {
        let mut f = Self { vcpus: vcpus as u16, ram_size, item: Vec::new(), at: 0 };
        f.select(SIGNATURE);
        f
    }

    /// Select item `key` and rewind to its first byte; an unknown key selects an empty item.
    pub fn select(&mut self, key: u16) {
        self.item = match key {
            SIGNATURE => b"QEMU".to_vec(),
            // Bit 0: the traditional interface; no DMA (bit 1).
            ID => 1u32.to_le_bytes().to_vec(),
            RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            NB_CPUS | MAX_CPUS => self.vcpus.to_le_bytes().to_vec(),
            // An empty file directory: a big-endian count of 0.
            FILE_DIR => 0u32.to_be_bytes().to_vec(),
            _ => Vec::new(),
        };
        self.at = 0;
    }

    /// The next byte of the selected item (0 past its end, as QEMU reads).
    pub fn read_byte(&mut self) -> u8 {
        let b = self.item.get(self.at).copied().unwrap_or(0);
        self.at = self.at.saturating_add(1);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.select(key);
        (0..n).map(|_| f.read_byte()).collect()
    }

    #[test]
    fn items_read_as_qemu_serves_them() {
        let mut f = FwCfg::new(3, 64 << 20);
        assert_eq!(read(&mut f, SIGNATURE, 5), b"QEMU\0");
        assert_eq!(read(&mut f, NB_CPUS, 2), [3, 0]);
        assert_eq!(read(&mut f, ID, 4), [1, 0, 0, 0]);
        assert_eq!(read(&mut f, RAM_SIZE, 8), (64u64 << 20).to_le_bytes());
        assert_eq!(read(&mut f, FILE_DIR, 4), [0; 4]);
        assert_eq!(read(&mut f, 0x4242, 2), [0, 0], "unknown items are empty");
        // Reading on continues where it was; selecting again rewinds.
        f.select(SIGNATURE);
        assert_eq!((f.read_byte(), f.read_byte()), (b'Q', b'E'));
    }
}
