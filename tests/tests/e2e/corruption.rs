//! The corruption harness in CI: a few dozen seeded cases (byte flips, page headers,
//! zeroed pages, truncation, an emptied file) over small and medium stores. No panic, no
//! "ok" from `verify` on a damaged file, no capture accepted on a store found damaged, and
//! every frame whose objects were intact restores byte-identical after `repair`. A failure
//! names each failing case and the command that replays it.

use kairos_simulations::corruption::{self, SIZES};

/// Cases run in CI (the benchmark runs thousands: see BENCHMARKS.md).
const CI_CASES: u64 = 36;

#[test]
fn damaged_stores_never_panic_never_verify_ok_and_repair_keeps_intact_frames() {
    let sizes = &SIZES[..2];
    let summary = corruption::run(sizes, CI_CASES, 1, |_, _| {}).unwrap();
    assert_eq!(summary.cases, CI_CASES);
    assert!(
        summary.passed(),
        "failing cases:\n{}",
        summary.failing_cases.join("\n")
    );
    assert_eq!(summary.panics, 0);
    assert_eq!(summary.false_ok, 0);
    assert!(
        summary.damaged > CI_CASES / 2,
        "most seeded cases damage the content ({} of {CI_CASES})",
        summary.damaged
    );
    assert!(summary.frames_recovered > 0);
}
