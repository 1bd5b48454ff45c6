//! Hostile input from the user: paths that are not guest files, files that are too big or
//! lie about their size, and every flag at and beyond its limits. Each gets a clear message
//! and a non-zero status, with bounded memory: every run here has a 1 GiB address-space limit
//! and a wall-clock limit, so a vmcall that read `/dev/zero` to the end would fail the test
//! instead of taking the machine down.

use std::process::{Command, Output};

mod common;

use common::scratch;

/// `vmcall ARGS` with at most 1 GiB of address space and 60 seconds.
fn bounded(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec timeout 60 \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_vmcall"))
        .args(args)
        .output()
        .expect("run vmcall")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn refused(args: &[&str], status: i32, want: &str) {
    let o = bounded(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(status), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
}

#[test]
fn paths_that_are_not_guest_files_are_refused_before_a_byte_is_read() {
    let dir = scratch("paths");
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let socket = dir.join("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let loop_link = dir.join("loop");
    std::os::unix::fs::symlink(&loop_link, &loop_link).unwrap();
    let dangling = dir.join("dangling");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    for (path, want) in [
        ("/dev/zero".into(), "is a character device, not a regular file"),
        ("/dev/urandom".into(), "is a character device"),
        (fifo.display().to_string(), "is a FIFO (named pipe), not a regular file"),
        (socket.display().to_string(), "No such device or address"),
        (dir.display().to_string(), "is a directory, not a regular file"),
        (empty.display().to_string(), "is empty"),
        (loop_link.display().to_string(), "Too many levels of symbolic links"),
        (dangling.display().to_string(), "No such file or directory"),
        ("/etc/hostname/x".into(), "Not a directory"),
    ] {
        refused(&["run", &path], 125, want);
        assert!(stderr(&bounded(&["run", &path])).contains(&format!("guest '{path}'")));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn files_bigger_than_an_image_can_be_are_refused_unread() {
    let dir = scratch("sizes");
    let sparse = dir.join("sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(100 << 30).unwrap(); // 100 GiB, no blocks
    let path = sparse.display().to_string();
    refused(
        &["run", &path],
        125,
        "is 107374182400 bytes (100.0 GiB); an image may have at most 67108864 bytes",
    );
    // The bound follows --memory, up to 1 GiB.
    refused(&["run", &path, "--memory", "512M"], 125, "at most 536870912 bytes (512.0 MiB)");
    refused(&["run", &path, "--memory", "64G"], 125, "at most 1073741824 bytes (1.0 GiB)");
    // One byte over the bound is refused; at the bound the file is read, and judged as ELF.
    f.set_len((64 << 20) + 1).unwrap();
    refused(&["run", &path], 125, "an image may have at most 67108864 bytes");
    f.set_len(64 << 20).unwrap();
    refused(&["run", &path], 125, "not an ELF file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_that_reads_otherwise_than_its_size_is_refused() {
    // sysfs files claim a page and read a few bytes: as a file changing under the reader.
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    if std::path::Path::new(path).exists() {
        refused(&["run", path], 125, "changed while it was read");
    }
}

#[test]
fn flags_at_and_beyond_their_limits() {
    let demo = vmcall_test_guests::path("demo").expect("demo guest");
    let long_cmdline = "x".repeat(4097);
    for (args, status, want) in [
        // Sizes and counts out of range are usage errors (status 2), caught while parsing.
        (
            vec!["--memory", "0"],
            2,
            "'0' is not a guest RAM size: it must be a multiple of 2M from 2M to 64G",
        ),
        (vec!["--memory", "1M"], 2, "a multiple of 2M"),
        (vec!["--memory", "3M"], 2, "'3M' is not a guest RAM size"),
        (vec!["--memory", "65G"], 2, "from 2M to 64G"),
        (vec!["--memory", "18446744073709551615"], 2, "is not a guest RAM size"),
        (vec!["--memory", "99999999999999G"], 2, "is too large"),
        (vec!["--memory", "2M"], 125, "outside the guest's load area"),
        (vec!["--vcpus", "0"], 2, "0 is not in 1..=64"),
        (vec!["--vcpus", "65"], 2, "65 is not in 1..=64"),
        (vec!["--vcpus", "4294967296"], 2, "invalid value '4294967296'"),
        (vec!["--timeout", "1000000001"], 2, "is out of range"),
        (vec!["--timeout", "nan"], 2, "is not a duration"),
        (vec!["--timeout", "-1s"], 2, "unexpected argument"),
        (vec!["--hypercall", "18446744073709551616=echo"], 2, "is not a number"),
        (vec!["--hypercall", "20=const:0x10000000000000000"], 2, "is not a number"),
        (vec!["--", &long_cmdline], 125, "guest command line is 4097 bytes; at most 4096 fit"),
    ] {
        let mut all = vec!["run", demo];
        all.extend(args.iter().copied());
        if args[0] != "--" {
            all.extend(["--backend", "emu"]);
        }
        refused(&all, status, want);
    }
}

/// The largest VM the flags allow builds and runs (lazily mapped RAM, one thread per vCPU).
#[test]
fn the_largest_vm_the_flags_allow_runs() {
    let demo = vmcall_test_guests::path("demo").expect("demo guest");
    let long_cmdline = "y".repeat(4096);
    let o = Command::new(env!("CARGO_BIN_EXE_vmcall"))
        .args(["run", demo, "--backend", "emu", "--memory", "64G", "--vcpus", "64"])
        .args(["--timeout", "120s", "--", &long_cmdline])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
