//! SIGINT and SIGTERM stop a run gracefully: the handler sets a [`StopToken`] (one atomic
//! store, safe in a signal handler) and records the signal; the trainer checks the token
//! between steps. The handlers reset themselves (`SA_RESETHAND`), so a second signal ends the
//! process at once, as without them.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use hone_train::StopToken;

static TOKEN: OnceLock<StopToken> = OnceLock::new();
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    RECEIVED.store(signal, Ordering::SeqCst);
    if let Some(token) = TOKEN.get() {
        token.stop();
    }
}

/// Installs the handlers of SIGINT and SIGTERM; returns the token they stop.
pub fn stop_on_signals() -> StopToken {
    let token = TOKEN.get_or_init(StopToken::default).clone();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only does
        // atomic operations on statics initialised above.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    token
}

/// The signal that stopped the run, if one did.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}
