//! Data-plane access: bearer tokens read from `proxy.data_tokens_file`, each allowed a set of
//! tenants or all of them, re-read when the file changes.
//!
//! The file holds one token a line, `<token> <tenant-uuid>[,<tenant-uuid>...]` or
//! `<token> *`, with `#` comments and blank lines. Only SHA-256 digests of the tokens are kept;
//! a presented token is hashed and compared with every digest in constant time, so neither the
//! answer's time nor a log line says anything about a token. A file that does not parse keeps
//! the tokens in use (a bad edit never locks everybody out, nor lets everybody in), and its
//! errors name lines, never tokens.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::ApiError;
use crate::metrics::ProxyMetrics;

/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Why a tokens file was refused. Never holds a token.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading data tokens file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("data tokens file {path}, line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

/// Which tenants a token may use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tenants {
    All,
    Some(HashSet<Uuid>),
}

#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    tenants: Tenants,
}

/// The tokens of one version of the file.
#[derive(Debug, Default)]
pub struct TokenSet {
    entries: Vec<Entry>,
}

impl TokenSet {
    /// Parses a tokens file's text; `path` is for the error messages only.
    pub fn parse(text: &str, path: &str) -> Result<Self, TokensError> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut lines_of = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let number = i + 1;
            let failed = |message: String| TokensError::Line {
                path: path.to_owned(),
                line: number,
                message,
            };
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [token, tenants] = fields.as_slice() else {
                return Err(failed(format!(
                    "expected `<token> <tenant-uuid>[,<tenant-uuid>...]` or `<token> *`, found {} fields",
                    fields.len()
                )));
            };
            if token.len() < MIN_TOKEN_BYTES {
                return Err(failed(format!(
                    "the token is shorter than {MIN_TOKEN_BYTES} bytes"
                )));
            }
            // A '#' ends the line above, so a token never holds one; other visible ASCII only,
            // so every token fits in an Authorization header.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(failed(
                    "the token holds a character other than visible ASCII".to_owned(),
                ));
            }
            let tenants = if *tenants == "*" {
                Tenants::All
            } else {
                let mut set = HashSet::new();
                for (n, tenant) in tenants.split(',').enumerate() {
                    // The value is not echoed: a line with its fields swapped holds a token here.
                    let id = Uuid::parse_str(tenant).map_err(|_| {
                        failed(format!(
                            "tenant {} is not a UUID (a list of tenant UUIDs, or `*` for every tenant)",
                            n + 1
                        ))
                    })?;
                    set.insert(id);
                }
                Tenants::Some(set)
            };
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if let Some(at) = entries.iter().position(|e| e.digest == digest) {
                return Err(failed(format!(
                    "the token of line {} appears again",
                    lines_of[at]
                )));
            }
            lines_of.push(number);
            entries.push(Entry { digest, tenants });
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry whose token hashes to `digest`, looking at every entry (no early exit).
    fn find(&self, digest: &[u8; 32]) -> Option<usize> {
        let mut found = None;
        for (i, entry) in self.entries.iter().enumerate() {
            if switchyard_runtime::admin::constant_time_eq(digest, &entry.digest) {
                found = Some(i);
            }
        }
        found
    }
}

/// What a request may do, as its token said.
#[derive(Debug)]
pub struct Grant(Option<(Arc<TokenSet>, usize)>);

impl Grant {
    /// 403 `forbidden_tenant` unless the request may use `tenant`.
    pub fn check(&self, tenant: Uuid) -> Result<(), ApiError> {
        let Some((set, i)) = &self.0 else {
            return Ok(());
        };
        match &set.entries[*i].tenants {
            Tenants::All => Ok(()),
            Tenants::Some(tenants) if tenants.contains(&tenant) => Ok(()),
            Tenants::Some(_) => Err(ApiError::ForbiddenTenant),
        }
    }
}

/// The data plane's tokens, swapped whole on each successful reload.
#[derive(Debug)]
pub struct DataTokens {
    path: String,
    set: ArcSwap<TokenSet>,
    /// Digest of the file content last looked at (parsed or refused), so an unchanged file is
    /// not parsed, logged or counted again.
    seen: std::sync::Mutex<[u8; 32]>,
}

impl DataTokens {
    /// Reads and parses `path`; a file that cannot be read or parsed is a start-up error.
    pub fn load(path: &std::path::Path) -> Result<Self, TokensError> {
        // Kept as text: it names the file in errors and logs.
        let path = path.display().to_string();
        let text = read(&path)?;
        let set = TokenSet::parse(&text, &path)?;
        Ok(Self {
            path,
            set: ArcSwap::from_pointee(set),
            seen: std::sync::Mutex::new(Sha256::digest(text.as_bytes()).into()),
        })
    }

    /// Tokens in use now.
    pub fn len(&self) -> usize {
        self.set.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.load().is_empty()
    }

    /// Checks `Authorization: Bearer <token>`: 401 `unauthenticated` when it is missing or
    /// names no token in use.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Grant, ApiError> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ApiError::Unauthenticated)?;
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let set = self.set.load_full();
        match set.find(&digest) {
            Some(i) => Ok(Grant(Some((set, i)))),
            None => Err(ApiError::Unauthenticated),
        }
    }

    /// Re-reads the file when its content changed; a file that cannot be read or parsed keeps
    /// the tokens in use. Returns whether a new set was taken.
    pub fn reload(&self, metrics: &ProxyMetrics) -> bool {
        let text = match read(&self.path) {
            Ok(text) => text,
            Err(e) => {
                // A missing file is seen as empty content, so it is reported once, not every poll.
                if self.changed(&[0; 32]) {
                    tracing::warn!(error = %e, "data tokens not reloaded; keeping the tokens in use");
                    metrics
                        .data_token_reloads
                        .with_label_values(&["error"])
                        .inc();
                }
                return false;
            }
        };
        if !self.changed(&Sha256::digest(text.as_bytes()).into()) {
            return false;
        }
        match TokenSet::parse(&text, &self.path) {
            Ok(set) => {
                tracing::info!(tokens = set.len(), path = %self.path, "data tokens reloaded");
                metrics
                    .data_tokens
                    .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
                metrics.data_token_reloads.with_label_values(&["ok"]).inc();
                self.set.store(Arc::new(set));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "data tokens not reloaded; keeping the tokens in use");
                metrics
                    .data_token_reloads
                    .with_label_values(&["error"])
                    .inc();
                false
            }
        }
    }

    /// Records `digest` as the content last seen; true when it differs from the one before.
    fn changed(&self, digest: &[u8; 32]) -> bool {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *seen != *digest;
        *seen = *digest;
        changed
    }
}

fn read(path: &str) -> Result<String, TokensError> {
    std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Re-reads the tokens file every `every` until `stop` flips (a Secret update lands in the
/// file without a restart).
pub async fn watch(
    tokens: &DataTokens,
    metrics: &ProxyMetrics,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => { tokens.reload(metrics); }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0f4e8c9a-5c1b-4f6e-9a77-0c2b7d1e3f41";
    const B: &str = "7a1d2e3f-4b5c-4d6e-8f90-a1b2c3d4e5f6";

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().expect("ascii"));
        headers
    }

    #[test]
    fn parses_tenants_stars_and_comments() {
        let text = format!(
            "# app tokens\n\napp-token-0123456789 {A},{B}  # orders\nops-token-0123456789 *\n"
        );
        let set = TokenSet::parse(&text, "f").expect("valid");
        assert_eq!(set.len(), 2);
        let tokens = DataTokens {
            path: "f".into(),
            set: ArcSwap::from_pointee(set),
            seen: std::sync::Mutex::new([0; 32]),
        };
        let (a, b) = (
            Uuid::parse_str(A).expect("uuid"),
            Uuid::parse_str(B).expect("uuid"),
        );
        let other = Uuid::new_v4();
        let app = tokens
            .authenticate(&headers("Bearer app-token-0123456789"))
            .expect("known token");
        assert!(app.check(a).is_ok() && app.check(b).is_ok());
        assert!(matches!(app.check(other), Err(ApiError::ForbiddenTenant)));
        let ops = tokens
            .authenticate(&headers("bearer ops-token-0123456789"))
            .expect("scheme is case-insensitive");
        assert!(ops.check(other).is_ok());
        for refused in [
            "Bearer app-token-012345678",
            "Bearer app-token-0123456789x",
            "Basic x",
            "Bearer ",
        ] {
            assert!(
                matches!(
                    tokens.authenticate(&headers(refused)),
                    Err(ApiError::Unauthenticated)
                ),
                "{refused}"
            );
        }
        assert!(matches!(
            tokens.authenticate(&HeaderMap::new()),
            Err(ApiError::Unauthenticated)
        ));
    }

    #[test]
    fn refusals_name_the_line_never_the_token() {
        let secret = "s3cret-token-0123456789";
        for (text, line, says) in [
            (format!("{secret}\n"), 1, "fields"),
            (format!("\n{secret} not-a-uuid\n"), 2, "is not a UUID"),
            (format!("{secret} {A},\n"), 1, "is not a UUID"),
            ("short *\n".to_owned(), 1, "shorter"),
            (
                format!("{secret} *\n{secret} {A}\n"),
                2,
                "line 1 appears again",
            ),
            (format!("{A} {secret}\n"), 1, "is not a UUID"),
            (format!("{secret} * extra\n"), 1, "fields"),
        ] {
            let err = TokenSet::parse(&text, "tokens")
                .expect_err(&text)
                .to_string();
            assert!(err.contains(&format!("line {line}:")), "{err}");
            assert!(err.contains(says), "{err}");
            assert!(!err.contains(secret), "{err}");
        }
        assert!(TokenSet::parse("# nobody\n", "f")
            .expect("valid")
            .is_empty());
    }
}
