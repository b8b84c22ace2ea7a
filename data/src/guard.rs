//! arrow-rs and parquet (57.3) panic on some malformed files instead of returning an error:
//! tests/inputs.rs found `arrow-buffer`'s `Buffer::slice` ("the offset of the new Buffer
//! cannot exceed the existing length") and capacity overflows while decoding mutated files.
//! Their calls run through [`guarded`], so a corrupt file is an error that names it, and the
//! panic's message is not printed as if Temper had crashed.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::Once;

thread_local! {
    /// Set while a guarded call runs on this thread: its panics are reported as errors.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into `Err(the panic's message)`.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // Chained: panics outside guarded calls are printed as before.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(guarded(|| 3), Ok(3));
        let err = guarded(|| -> u32 { panic!("offset {} out of range", 7) }).unwrap_err();
        assert_eq!(err, "offset 7 out of range");
        assert_eq!(guarded(|| -> u32 { panic!("static") }).unwrap_err(), "static");
    }
}
