//! Property tests of append decoding and path parsing over arbitrary bytes and arbitrary JSON
//! (the CI stand-in for the cargo-fuzz target in fuzz/, which needs a nightly toolchain):
//! `check_decode_append` panics when an answer breaks a property.

use proptest::prelude::*;
use serde_json::{json, Value};
use switchyard_proxy::api::{check_decode_append, Endpoint, Limits};

const LIMITS: Limits = Limits {
    max_events: 4,
    max_field_bytes: 16,
};

/// Any JSON value, a few levels deep, with strings that like to hit the edge cases.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 \\x00\u{e9}\u{1F600}-]{0,24}".prop_map(Value::from),
        Just(json!("2024-01-15T10:30:00Z")),
        Just(json!("0190a6e0-0000-7000-8000-000000000001")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_\\x00]{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An event that is nearly valid: each field valid, missing, or replaced by any JSON.
fn event() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(None),
            Just(Some(json!("0190a6e0-0000-7000-8000-000000000001"))),
            any_json().prop_map(Some)
        ],
        prop_oneof![
            "[A-Za-z\\x00]{0,20}".prop_map(|s| Some(json!(s))),
            any_json().prop_map(Some),
            Just(None)
        ],
        prop_oneof![
            any_json().prop_map(|v| Some(json!({ "v": v }))),
            any_json().prop_map(Some)
        ],
        prop_oneof![Just(None), "[a-z\\x00]{0,20}".prop_map(|s| Some(json!(s)))],
        prop_oneof![
            Just(None),
            Just(Some(json!("2024-01-15T10:30:00.123456Z"))),
            any_json().prop_map(Some)
        ],
    )
        .prop_map(|(id, ty, payload, actor, ts)| {
            let mut event = serde_json::Map::new();
            for (k, v) in [
                ("event_id", id),
                ("event_type", ty),
                ("payload", payload),
                ("actor_id", actor),
                ("timestamp", ts),
            ] {
                if let Some(v) = v {
                    event.insert(k.to_owned(), v);
                }
            }
            Value::Object(event)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_decode_append(&bytes, LIMITS);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = Endpoint::parse(text, LIMITS.max_field_bytes);
        }
    }

    #[test]
    fn arbitrary_json(value in any_json()) {
        check_decode_append(value.to_string().as_bytes(), LIMITS);
    }

    #[test]
    fn nearly_valid_appends(
        expected in prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from), any_json()],
        events in prop::collection::vec(event(), 0..7),
    ) {
        let body = json!({ "expected_version": expected, "events": events });
        check_decode_append(body.to_string().as_bytes(), LIMITS);
    }

    /// Payload text built from fragments PostgreSQL's jsonb refuses or only just holds (lone
    /// surrogates, `\u0000`, numbers at the edges of `numeric`, deep nesting): every answer keeps
    /// the properties, and a payload with a refused fragment is a 422 `unstorable_payload`
    /// whose path starts at that event's payload.
    #[test]
    fn payload_edges(fragments in prop::collection::vec(prop_oneof![
        Just((r#""ok""#, true)), Just((r#""\ud83d\ude00""#, true)), Just((r#""\\u0000""#, true)),
        Just(("1e131071", true)), Just(("1e-16383", true)), Just(("0e999999", true)),
        Just(("-0.5E+3", true)), Just((r#"[[[[[[[[1]]]]]]]]"#, true)), Just(("null", true)),
        Just((r#""\ud800""#, false)), Just((r#""\udc00x""#, false)), Just((r#""a\u0000""#, false)),
        Just(("1e131072", false)), Just(("1e-16384", false)), Just(("1e99999999999", false)),
    ], 1..6), nest in 0usize..3) {
        let members: Vec<String> = fragments.iter().enumerate().map(|(i, (f, _))| format!(r#""k{i}":{f}"#)).collect();
        let payload = format!("{}{{{}}}{}", r#"{"n":"#.repeat(nest), members.join(","), "}".repeat(nest));
        let body = format!(r#"{{"events":[{{"event_type":"A","payload":{{}}}},{{"event_type":"B","payload":{payload}}}]}}"#);
        check_decode_append(body.as_bytes(), LIMITS);
        let storable = fragments.iter().all(|(_, ok)| *ok);
        match switchyard_proxy::api::decode_append(body.as_bytes(), LIMITS) {
            Ok(_) => prop_assert!(storable, "{body}"),
            Err(e) => {
                prop_assert!(!storable, "{body}: {e}");
                let text = format!("{:?}", e.into_response());
                prop_assert!(text.contains("422"), "{text}");
            }
        }
        if !storable {
            let err = switchyard_proxy::payload::check(&payload, "events[1].payload").expect_err("refused");
            prop_assert!(err.path.starts_with("events[1].payload"), "{}", err.path);
        }
    }

    #[test]
    fn arbitrary_paths(segments in prop::collection::vec("[a-zA-Z0-9%/._-]{0,40}", 0..8)) {
        let path = format!("/{}", segments.join("/"));
        if let Ok(Some(Endpoint::Stream { aggregate_type, .. })) = Endpoint::parse(&path, LIMITS.max_field_bytes) {
            prop_assert!(!aggregate_type.is_empty() && aggregate_type.len() <= LIMITS.max_field_bytes);
            prop_assert!(!aggregate_type.contains('\0'));
        }
    }
}
