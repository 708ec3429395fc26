//! Property tests of data-plane path and query parsing (the CI stand-in for the cargo-fuzz
//! target `parse_path`), and a replay of every seed and corpus file of the proxy's fuzz targets
//! through their oracles: `check_parse_request` and `check_decode_append` panic when an answer
//! breaks a property.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use switchyard_proxy::api::{check_decode_append, check_parse_request, Limits};

const MAX_FIELD_BYTES: usize = 16;

/// A segment that likes percent signs, hex digits, signs and multi-byte characters.
const SEGMENT: &str = "([a-fA-F0-9 ._\u{e9}\u{1F600}\\x00-]|%[0-9a-fA-F+-]{0,2}){0,10}";

/// The fuzz input format of `parse_path`: the text up to the first `?` is the path, the rest
/// the query.
fn check(text: &str) {
    let (path, query) = text.split_once('?').unwrap_or((text, ""));
    check_parse_request(path, query, MAX_FIELD_BYTES);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC{0,120}") {
        check(&text);
    }

    /// Paths shaped like the API's, each segment valid or mangled.
    #[test]
    fn api_shaped_paths(
        tenant in prop_oneof![Just("0190a6e0-0000-7000-8000-000000000001".to_owned()), SEGMENT],
        aggregate_type in SEGMENT,
        aggregate_id in prop_oneof![Just("0190a6e0-0000-7000-8000-000000000002".to_owned()), SEGMENT],
        feed in any::<bool>(),
        query in "([a-z_]{0,14}(=[0-9+\\-a-z]{0,22})?&?){0,4}",
    ) {
        let path = if feed {
            format!("/v1/tenants/{tenant}/events")
        } else {
            format!("/v1/tenants/{tenant}/streams/{aggregate_type}/{aggregate_id}/events")
        };
        check_parse_request(&path, &query, MAX_FIELD_BYTES);
    }
}

/// `fuzz/seeds/<target>` and, when a fuzz run left one, `fuzz/corpus/<target>`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in [
        fuzz.join("seeds").join(target),
        fuzz.join("corpus").join(target),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    files.sort();
    files
}

#[test]
fn every_seed_and_corpus_file_passes_the_oracles() {
    let seeds = inputs("parse_path");
    assert!(!seeds.is_empty(), "fuzz/seeds/parse_path is empty");
    for file in &seeds {
        let bytes = std::fs::read(file).expect("readable seed");
        check(&String::from_utf8_lossy(&bytes));
    }
    let seeds = inputs("decode_append");
    assert!(!seeds.is_empty(), "fuzz/seeds/decode_append is empty");
    for file in &seeds {
        let bytes = std::fs::read(file).expect("readable seed");
        check_decode_append(
            &bytes,
            Limits {
                max_events: 8,
                max_field_bytes: 32,
            },
        );
    }
}
