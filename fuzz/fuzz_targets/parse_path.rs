//! Data-plane path and query parsing on arbitrary input (the text up to the first `?` is the
//! path, the rest the query): no panic, and every answer has the properties
//! `check_parse_request` asserts (refusals are 400/422; a stream's type is its segment
//! percent-decoded by RFC 3986; limits hold).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_proxy::api::check_parse_request;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (path, query) = text.split_once('?').unwrap_or((&text, ""));
    check_parse_request(path, query, 32);
});
