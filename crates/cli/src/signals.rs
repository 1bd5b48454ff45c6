//! SIGINT and SIGTERM stop the VM (or every instance) through its normal end (statistics are printed and written,
//! the control socket removed); a second one exits at once.

use crate::error::Error;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

/// The signal thread of one run.
#[derive(Debug)]
pub struct StopOnSignal {
    handle: Handle,
    thread: std::thread::JoinHandle<()>,
    caught: Arc<AtomicI32>,
}

impl StopOnSignal {
    /// Call `stop` on the first SIGINT or SIGTERM (which should end the run normally); exit
    /// at once on the second.
    pub fn install(stop: impl Fn() + Send + 'static) -> Result<Self, Error> {
        let mut signals = Signals::new([SIGINT, SIGTERM])
            .map_err(|e| Error::io("cannot install the signal handlers", e))?;
        let handle = signals.handle();
        let caught = Arc::new(AtomicI32::new(0));
        let thread = {
            let caught = caught.clone();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    for sig in signals.forever() {
                        if caught.swap(sig, Ordering::SeqCst) != 0 {
                            eprintln!("vmcall: signal {sig} again: exiting now");
                            std::process::exit(128 + sig);
                        }
                        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                        eprintln!("vmcall: {name}: stopping the VM");
                        stop();
                    }
                })
                .map_err(|e| Error::io("cannot start the signal thread", e))?
        };
        Ok(Self { handle, thread, caught })
    }

    /// Stop listening; the signal that stopped the VM, if one did.
    pub fn finish(self) -> Option<i32> {
        self.handle.close();
        let _ = self.thread.join();
        match self.caught.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(sig),
        }
    }
}
