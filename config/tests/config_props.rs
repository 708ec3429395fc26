//! Property tests of the config loader (the CI stand-in for the cargo-fuzz target
//! `load_config`), and a replay of every seed and corpus file of that target through its
//! oracle: `check_load_config` panics when loading panics or an error echoes the secret.

use std::path::Path;

use proptest::prelude::*;
use switchyard_config::{check_load_config, ORACLE_SECRET};

/// A key: known ones (top level, `[proxy]`, `[control]`, `[[stores]]`), unknown, quoted.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "control_url",
            "default_store",
            "id",
            "url",
            "max_connections",
            "listen",
            "admin_listen",
            "admin_token",
            "gate_wait_ms",
            "routing_listen",
            "max_header_bytes",
            "tls_cert_path",
            "batch_size",
            "cutover_timeout_ms",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,12}",
        Just(format!("\"{ORACLE_SECRET}\"")),
    ]
}

/// A value: strings holding the secret or `${PW}` in URL-ish places, numbers, booleans,
/// arrays, tables, and garbage.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(format!("\"{ORACLE_SECRET}\"")),
        Just("\"${PW}\"".to_owned()),
        Just("\"${PW\"".to_owned()),
        Just("\"postgres://u:${PW}@127.0.0.1/db?password=${PW}\"".to_owned()),
        Just(format!("\"mysql://u:{ORACLE_SECRET}@h/db\"")),
        Just(format!("\"sqlite://{ORACLE_SECRET}\"")),
        Just(format!("\"postgres://{ORACLE_SECRET}\"")),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("\"shared\"".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just(format!("[\"{ORACLE_SECRET}\", 1]")),
        Just(format!("{{ a = \"{ORACLE_SECRET}\" }}")),
        Just(format!("'{ORACLE_SECRET}")),
        "\\PC{0,16}",
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop::sample::select(vec!["[proxy]", "[control]", "[[stores]]", "[stores]", "[x]"])
            .prop_map(str::to_owned),
        1 => "\\PC{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_load_config(&bytes);
    }

    #[test]
    fn config_shaped_text(lines in prop::collection::vec(line(), 0..14)) {
        check_load_config(lines.join("\n").as_bytes());
    }
}

#[test]
fn every_seed_and_corpus_file_passes_the_oracle() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in [
        fuzz.join("seeds/load_config"),
        fuzz.join("corpus/load_config"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    assert!(!files.is_empty(), "fuzz/seeds/load_config is empty");
    files.sort();
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let bytes = std::fs::read(file).expect("readable seed");
            std::panic::catch_unwind(|| check_load_config(&bytes)).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "the oracle failed on {failed:?}");
}
