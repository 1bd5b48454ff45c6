//! The control socket's server: a thread that accepts connections on a Unix socket (mode 0600,
//! peers of another uid refused by SO_PEERCRED) and answers each request line of each
//! connection, a few connections at a time, each on its own short-lived thread. Never a vCPU
//! thread: requests only touch the table (lock-free for the vCPUs), the trace switch and the
//! stop flag.

use crate::error::Error;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::protocol::{self, Target, MAX_REQUEST};

/// Connections served at once; more are refused with an error reply.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running control server. Dropping it stops it and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket we bound, so we never remove someone else's.
    id: (u64, u64),
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` and serve `target` on a thread of its own.
    pub fn start(path: &Path, target: Arc<dyn Target + Send + Sync>) -> Result<Self, Error> {
        let listener = bind(path)?;
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let thread = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || serve(&listener, &target, &shutdown))
                .map_err(|e| Error::io("cannot start the control thread", e))?
        };
        Ok(Self {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            shutdown,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // Wake the accept loop and wait for it; if the socket file was removed or replaced
        // under us the loop cannot be woken: leave the thread (the process is ending).
        if UnixStream::connect(&self.path).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The default socket path: `$XDG_RUNTIME_DIR/vmcall/<pid>.sock`, or, without
/// XDG_RUNTIME_DIR, `/tmp/vmcall-<uid>/<pid>.sock`; the directory is created mode 0700 and
/// must be ours and private.
pub fn default_path() -> Result<PathBuf, Error> {
    let uid = rustix::process::getuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("vmcall"),
        None => std::env::temp_dir().join(format!("vmcall-{uid}")),
    };
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        Err(e) => return Err(Error::io(dir.display().to_string(), e)),
        Ok(meta) => {
            if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
                return Err(Error::Refused(format!(
                    "{} is not a private directory of this user (mode 0700); pass --control PATH",
                    dir.display()
                )));
            }
        }
    }
    Ok(dir.join(format!("{}.sock", std::process::id())))
}

/// Bind a fresh socket at `path`, mode 0600. A stale socket (nobody listening) is replaced; a
/// live one, or anything that is not a socket, is an error.
fn bind(path: &Path) -> Result<UnixListener, Error> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::Refused(format!(
                "{shown} exists and is not a socket; not replacing it"
            )));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::Refused(format!(
                    "{shown} is in use: another process (a running vmcall?) listens on it"
                )))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| Error::io(format!("cannot remove the stale socket {shown}"), e))?;
            }
            Err(e) => return Err(Error::io(format!("{shown} exists and cannot be checked"), e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(shown.to_string(), e)),
    }
    // Created 0600 (no window where others could connect), and set so again in case the file
    // system ignores the umask for sockets.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener =
        bound.map_err(|e| Error::io(format!("cannot create the control socket {shown}"), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("cannot make {shown} private"), e))?;
    Ok(listener)
}

fn serve(listener: &UnixListener, target: &Arc<dyn Target + Send + Sync>, shutdown: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    let me = rustix::process::getuid();
    for conn in listener.incoming() {
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else {
            // Out of descriptors, say: do not spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
        match rustix::net::sockopt::socket_peercred(&conn) {
            Ok(cred) if cred.uid == me => {}
            Ok(cred) => {
                let msg = format!(
                    "permission denied: this VM's control socket serves uid {} only, not uid {}",
                    me.as_raw(),
                    cred.uid.as_raw()
                );
                let _ = reply(&mut conn, &protocol::error(msg));
                continue;
            }
            Err(e) => {
                let _ = reply(&mut conn, &protocol::error(format!("cannot check the peer: {e}")));
                continue;
            }
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let msg = format!("busy: {MAX_CONNECTIONS} connections are open already");
            let _ = reply(&mut conn, &protocol::error(msg));
            continue;
        }
        let (target, done) = (target.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
            connection(conn, &*target);
            done.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answer each request line of one connection until it closes, idles, or misbehaves.
fn connection(conn: UnixStream, target: &dyn Target) {
    let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut out) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_REQUEST {
            let msg = format!("request longer than {MAX_REQUEST} bytes; closing the connection");
            let _ = reply(&mut out, &protocol::error(msg));
            return;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            if reply(&mut out, &protocol::error("request is not UTF-8")).is_err() {
                return;
            }
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        if reply(&mut out, &protocol::answer(text, target)).is_err() {
            return;
        }
    }
}

fn reply(out: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    out.write_all(s.as_bytes())
}
