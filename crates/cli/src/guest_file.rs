//! Reading the guest image a user names, with bounded memory whatever the path is: a device
//! (`/dev/zero`), a FIFO, a directory, a huge or sparse file or one that changes while it is
//! read gets a clear refusal, never an unbounded read or a hang.

use crate::error::Error;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The smallest bound on an image file: room for symbols and debug info beyond the loaded
/// segments, which must fit in guest RAM anyway.
pub const MIN_IMAGE_LIMIT: u64 = 64 << 20;
/// The largest bound on an image file, however much guest RAM there is.
pub const MAX_IMAGE_LIMIT: u64 = 1 << 30;

/// The most bytes an image file may have for a VM with `ram` bytes of guest RAM: the larger
/// of the RAM size and [`MIN_IMAGE_LIMIT`], and at most [`MAX_IMAGE_LIMIT`].
pub fn image_limit(ram: u64) -> u64 {
    ram.clamp(MIN_IMAGE_LIMIT, MAX_IMAGE_LIMIT)
}

/// Read the regular file at `path`, of at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let name = path.display();
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below);
    // on a regular file the flag does nothing.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(format!("cannot read guest '{name}'"), e))?;
    // The type and size of what was opened, not of what the path names now.
    let before =
        file.metadata().map_err(|e| Error::io(format!("cannot read guest '{name}'"), e))?;
    let kind = kind(&before);
    if !before.is_file() {
        return Err(Error::Refused(format!(
            "guest '{name}' is {kind}, not a regular file: vmcall runs a guest ELF from a file"
        )));
    }
    let size = before.len();
    if size == 0 {
        return Err(Error::Refused(format!("guest '{name}' is empty (its size is 0 bytes)")));
    }
    if size > limit {
        return Err(Error::Refused(format!(
            "guest '{name}' is {} bytes ({}); an image may have at most {limit} bytes ({}) \
             here: the larger of --memory and {} MiB, and at most {} GiB",
            size,
            human(size),
            human(limit),
            MIN_IMAGE_LIMIT >> 20,
            MAX_IMAGE_LIMIT >> 30
        )));
    }
    let mut image = Vec::with_capacity(size as usize);
    // One byte more than the size: a file that grew is noticed without reading all of it.
    (&file)
        .take(size + 1)
        .read_to_end(&mut image)
        .map_err(|e| Error::io(format!("cannot read guest '{name}'"), e))?;
    let after = file.metadata().map_err(|e| Error::io(format!("cannot read guest '{name}'"), e))?;
    if image.len() as u64 != size || changed(&before, &after) {
        return Err(Error::Refused(format!(
            "guest '{name}' changed while it was read ({size} bytes when opened, {} read, {} \
             now); run it again once it is written",
            image.len(),
            after.len()
        )));
    }
    Ok(image)
}

fn changed(a: &Metadata, b: &Metadata) -> bool {
    (a.len(), a.mtime(), a.mtime_nsec(), a.ino()) != (b.len(), b.mtime(), b.mtime_nsec(), b.ino())
}

fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// `size` in the largest binary unit that keeps it at least 1.
fn human(size: u64) -> String {
    match size {
        s if s >= 1 << 30 => format!("{:.1} GiB", s as f64 / (1u64 << 30) as f64),
        s if s >= 1 << 20 => format!("{:.1} MiB", s as f64 / (1u64 << 20) as f64),
        s if s >= 1 << 10 => format!("{:.1} KiB", s as f64 / 1024.0),
        s => format!("{s} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_follows_guest_ram_within_bounds() {
        assert_eq!(image_limit(2 << 20), 64 << 20);
        assert_eq!(image_limit(256 << 20), 256 << 20);
        assert_eq!(image_limit(64 << 30), 1 << 30);
    }

    #[test]
    fn non_files_and_oversized_files_are_refused_before_reading() {
        let e = read(Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("is a character device, not a regular file"), "{e}");
        let e = read(Path::new("/"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = read(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml").as_path(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("an image may have at most 10 bytes"), "{e}");
    }

    #[test]
    fn a_file_that_reads_otherwise_than_its_size_says_is_refused() {
        // sysfs files claim a size of one page and read a few bytes.
        let path = Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        if path.exists() {
            let e = read(path, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("changed while it was read"), "{e}");
        }
        let here = std::fs::metadata(env!("CARGO_MANIFEST_DIR")).unwrap();
        let there = std::fs::metadata("/").unwrap();
        assert!(changed(&here, &there) && !changed(&here, &here));
    }
}
