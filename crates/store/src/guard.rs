//! Guards around the embedded database: redb panics on some damaged pages (in release
//! builds too: `unreachable!`, slice indices out of range, failed `assert!`s while decoding
//! a page) and cannot be configured not to, so every call into it runs under
//! [`std::panic::catch_unwind`] and a panic becomes a `corrupt` error naming the file.
//!
//! While a guarded call runs, the default panic message is kept off standard error (the
//! error that replaces the panic says what happened); every other panic is printed as usual.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

thread_local! {
    /// How many guarded calls this thread is inside (guards nest).
    static GUARDED_DEPTH: Cell<u32> = const { Cell::new(0) };
}

static QUIET_HOOK: Once = Once::new();

/// Installs, once per process, a panic hook that stays silent for panics inside guarded
/// calls and hands every other panic to the hook that was installed before.
fn install_quiet_hook() {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED_DEPTH.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

/// The text of a caught panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `operation`; a panic inside it is returned as `Err(text of the panic)`.
///
/// `AssertUnwindSafe` is sound here because callers treat a caught panic as damage: the
/// redb handle whose call panicked is marked poisoned and never used again (see
/// `RedbBackend`), so no state a panic may have left half-updated is observed afterwards.
pub fn catch_panic<T>(operation: impl FnOnce() -> T) -> Result<T, String> {
    install_quiet_hook();
    GUARDED_DEPTH.with(|depth| depth.set(depth.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(operation));
    GUARDED_DEPTH.with(|depth| depth.set(depth.get() - 1));
    result.map_err(|payload| panic_text(payload.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_text_and_nesting_unwinds_cleanly() {
        let outer = catch_panic(|| {
            let inner: Result<(), String> = catch_panic(|| panic!("page 3 is damaged"));
            assert_eq!(inner.unwrap_err(), "page 3 is damaged");
            7
        });
        assert_eq!(outer.unwrap(), 7);
        assert_eq!(GUARDED_DEPTH.with(Cell::get), 0);
        let formatted = catch_panic(|| -> () { panic!("index {} out of range", 9) });
        assert_eq!(formatted.unwrap_err(), "index 9 out of range");
    }
}
