//! Kicking a vCPU thread out of KVM_RUN with a real-time signal.

use std::sync::{Arc, Mutex, Once};

use vmcall_vmm::backend::Interrupter;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The signal used; its handler does nothing, its only effect is KVM_RUN returning EINTR.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the no-op handler once per process (without SA_RESTART, so KVM_RUN returns EINTR).
pub fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register_signal_handler(kick_signal(), on_kick).expect("register vCPU kick signal handler");
    });
}

/// Interrupts one vCPU thread while it is alive.
pub struct SignalInterrupter {
    thread: libc::pthread_t,
    /// Cleared (under the lock) by the vCPU when it is dropped, so that the thread id is never
    /// signalled after the thread could have exited.
    alive: Arc<Mutex<bool>>,
}

impl SignalInterrupter {
    /// An interrupter for the calling thread.
    pub fn for_current_thread(alive: Arc<Mutex<bool>>) -> Self {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Self { thread, alive }
    }
}

impl Interrupter for SignalInterrupter {
    fn interrupt(&self) {
        let alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        if *alive {
            // SAFETY: the thread is alive (it clears `alive` under this lock before it ends),
            // so its pthread_t is valid; the signal's handler is installed and does nothing.
            unsafe { libc::pthread_kill(self.thread, kick_signal()) };
        }
    }
}
