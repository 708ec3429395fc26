//! What both admin ports (the proxy's and `serve`'s) share: the bearer-token check and the JSON
//! shape of an error reply.
//!
//! A token is compared in constant time, so the time an answer takes says nothing about how
//! much of a guess was right. Every error reply of both programs is one JSON object with
//! `error` (a stable code), `message` (for people) and `retryable` (whether the same request
//! can succeed later); some replies add fields after those.

use http::{header, HeaderMap};
use serde_json::{json, Map, Value};

/// Whether `headers` carry `Authorization: Bearer <expected>`; always true when no token is
/// configured (`expected` empty).
pub fn bearer_authorized(headers: &HeaderMap, expected: &str) -> bool {
    if expected.is_empty() {
        return true;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

/// Compares without an early exit, so the time taken says nothing about the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, byte) in b.iter().enumerate() {
        diff |= byte ^ a.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// The body of an error reply: `{"error": code, "message": message, "retryable": retryable}`,
/// as a map the caller may add fields to.
pub fn error_body(code: &str, message: &str, retryable: bool) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("error".into(), json!(code));
    body.insert("message".into(), json!(message));
    body.insert("retryable".into(), json!(retryable));
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn a_bearer_token_is_needed_only_when_one_is_configured() {
        let mut headers = HeaderMap::new();
        assert!(bearer_authorized(&headers, ""));
        assert!(!bearer_authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cre".parse().expect("ascii"),
        );
        assert!(!bearer_authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Basic s3cret".parse().expect("ascii"),
        );
        assert!(!bearer_authorized(&headers, "s3cret"));
        headers.insert(
            header::AUTHORIZATION,
            "Bearer s3cret".parse().expect("ascii"),
        );
        assert!(bearer_authorized(&headers, "s3cret"));
    }

    #[test]
    fn an_error_body_has_code_message_and_retryable() {
        let body = Value::Object(error_body("not_found", "no such route: GET /x", false));
        assert_eq!(
            body,
            json!({"error": "not_found", "message": "no such route: GET /x", "retryable": false})
        );
    }
}
