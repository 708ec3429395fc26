//! Database URLs as the configuration holds them: which backend a URL names, and how to print
//! it without its password. (Opening a pool on one is `switchyard_store::url`'s.)

/// A parsed database URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Postgres(String),
    /// The path of the database file.
    Sqlite(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The scheme only: the rest of a URL that is not one of ours may hold a password in a
    /// place no redaction knows (`postgres:/u:pw@h/db` parses with the password in its path).
    #[error("unsupported database URL scheme {0}: expected postgres://… or sqlite://PATH")]
    Scheme(String),
    /// Not shown: its query may hold a password.
    #[error("sqlite URL names no file")]
    EmptyPath,
    /// The parser's reason only: an unparseable URL cannot be shown without its password.
    #[error("postgres URL does not parse: {0}")]
    Unparseable(url::ParseError),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url::Url::parse(url).map_err(UrlError::Unparseable)?;
            return Ok(Self::Postgres(url.to_owned()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| UrlError::Scheme(scheme_of(url)))?;
        // Options after '?' are ours to set; keep only the path.
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(UrlError::EmptyPath);
        }
        Ok(Self::Sqlite(path.to_owned()))
    }
}

/// A URL's scheme for an error message (`"mysql:"`), or a note that it has none.
fn scheme_of(url: &str) -> String {
    match url.split_once(':') {
        Some((scheme, _))
            if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            format!("{scheme:?}")
        }
        _ => "(none)".to_owned(),
    }
}

/// Query parameters that carry a secret (libpq's and sqlx's names).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword"];

/// The URL with its secrets replaced by `***`: the password of its userinfo and the values of
/// `password`-like query parameters. The URL is parsed as the drivers parse it (the WHATWG
/// rules of the `url` crate, which sqlx uses: the userinfo ends at the authority's last `@`),
/// never pattern-matched; a URL that does not parse is not shown at all.
pub fn redact(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return "<unparseable URL>".to_owned();
    };
    if url.password().is_some() && url.set_password(Some("***")).is_err() {
        return "<unparseable URL>".to_owned();
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let secret = SECRET_PARAMS.iter().any(|p| key.eq_ignore_ascii_case(p));
                let value = if secret { "***".into() } else { value };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_backends_and_refuses_others() {
        assert!(matches!(
            StoreUrl::parse("postgres://u@h/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!(matches!(
            StoreUrl::parse("postgresql://u@h/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert_eq!(
            StoreUrl::parse("sqlite://data/x.db?mode=rwc").ok(),
            Some(StoreUrl::Sqlite("data/x.db".to_owned()))
        );
        assert!(StoreUrl::parse("sqlite://").is_err());
        let err = StoreUrl::parse("mysql://root:pw@h/db").expect_err("unsupported");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://a/b.db"), "sqlite://a/b.db");
        // What a pattern missed: a password in the query, a password holding '@' or ':'.
        for (url, secret) in [
            (
                "postgres://u@h/db?sslmode=require&password=s3cr3t",
                "s3cr3t",
            ),
            ("postgres://h/db?PassWord=s3cr3t&user=u", "s3cr3t"),
            ("postgres://u:p@ss@h:5432/db", "p@ss"),
            ("postgres://u:p%40ss@h:5432/db", "p%40ss"),
            ("postgres://u:a:b@h/db", "a:b"),
            ("postgresql://u:pw@[::1]:5432/db?sslpassword=k3y", "k3y"),
            ("not a url u:s3cr3t@h", "s3cr3t"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} → {shown}");
        }
        assert_eq!(
            redact("postgres://u:p@ss@h:5432/db?password=x&sslmode=require"),
            "postgres://u:***@h:5432/db?password=***&sslmode=require"
        );
    }
}
