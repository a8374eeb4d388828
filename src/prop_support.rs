//! What the property tests of every parser share (tests only).

use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError};

/// Deterministic and writing no files; `PROPTEST_CASES` and `PROPTEST_RNG_SEED` in the
/// environment still win, for a longer campaign.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let defaults = ProptestConfig::default();
    let set = |name: &str| std::env::var_os(name).is_some();
    ProptestConfig {
        cases: if set("PROPTEST_CASES") {
            defaults.cases
        } else {
            cases
        },
        rng_seed: if set("PROPTEST_RNG_SEED") {
            defaults.rng_seed
        } else {
            RngSeed::Fixed(0x6d61_696c_6761_7465)
        },
        failure_persistence: None,
        ..defaults
    }
}

/// Every reply is whole lines of printable ASCII: no client byte breaks a reply line.
pub(crate) fn check_write(write: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        write.is_empty() || write.ends_with(b"\r\n"),
        "{}",
        write.escape_ascii()
    );
    for line in write.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        prop_assert!(
            line.iter().all(|b| (0x20..0x7f).contains(b)),
            "{}",
            write.escape_ascii()
        );
    }
    Ok(())
}
