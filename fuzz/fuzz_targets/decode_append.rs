//! Append-body decoding and data-plane path parsing on arbitrary input: no panic, and every
//! answer has the properties `check_decode_append` asserts (refusals are 400/413/422; accepted
//! appends respect every limit).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_proxy::api::{check_decode_append, Endpoint, Limits};

const LIMITS: Limits = Limits {
    max_events: 8,
    max_field_bytes: 32,
};

fuzz_target!(|data: &[u8]| {
    check_decode_append(data, LIMITS);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(Some(Endpoint::Stream { aggregate_type, .. })) =
            Endpoint::parse(text, LIMITS.max_field_bytes)
        {
            assert!(!aggregate_type.is_empty() && aggregate_type.len() <= LIMITS.max_field_bytes);
        }
    }
});
