//! TLS to PostgreSQL: which `sslmode` and CA file a database connection uses.
//!
//! Both come from the config's keys (`sslmode`, `ssl_root_cert` beside a store's `url`;
//! `control_sslmode`, `control_ssl_root_cert` beside `control_url`) or from the URL's own
//! `sslmode=` and `sslrootcert=` parameters, which must agree when both are given. They are
//! checked when the config loads (a mode that checks certificates needs a readable CA file) and
//! written into the URL, where the driver (sqlx over rustls with ring) reads them, so every pool
//! the process opens on that database uses them.

use std::fmt;

/// How a connection to PostgreSQL uses TLS; libpq's names and meanings, but for `verify-ca`
/// (see [`SslMode::VerifyCa`]). libpq's `allow` is refused: sqlx treats it as `disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Cleartext only.
    Disable,
    /// TLS when the server offers it, without checking its certificate; cleartext otherwise.
    /// The default.
    Prefer,
    /// TLS or no connection; the certificate is not checked (with a CA file: `verify-ca`).
    Require,
    /// TLS, the certificate chain checked against the CA file. The driver (sqlx 0.8.6 with
    /// rustls 0.23.24 or later, sqlx issue 3793) checks the host name as well, so this is
    /// `verify-full` in effect.
    VerifyCa,
    /// TLS, the chain checked against the CA file and the certificate's names against the host.
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static str = "disable, prefer, require, verify-ca or verify-full";

    /// Parses libpq's name, as the driver does (case-insensitively).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "disable" => Some(Self::Disable),
            "prefer" => Some(Self::Prefer),
            "require" => Some(Self::Require),
            "verify-ca" => Some(Self::VerifyCa),
            "verify-full" => Some(Self::VerifyFull),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The URL parameters the driver reads for the mode and for the CA file (its aliases too).
const MODE_PARAMS: &[&str] = &["sslmode", "ssl-mode"];
const ROOT_CERT_PARAMS: &[&str] = &["sslrootcert", "ssl-root-cert", "ssl-ca"];

/// The names, in the config, of one database's URL and TLS keys, for errors.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    pub url: &'a str,
    pub sslmode: &'a str,
    pub ssl_root_cert: &'a str,
}

/// Why a database's TLS settings are refused. Messages name keys, never the URL.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{key} must be {}", SslMode::NAMES)]
    UnknownMode { key: String },
    #[error("the sslmode= of {url_key} must be {}", SslMode::NAMES)]
    UnknownUrlMode { url_key: String },
    #[error(
        "{key} = \"{key_mode}\" but {url_key} says sslmode={url_mode}: set the mode in one place"
    )]
    ModesDisagree {
        key: String,
        key_mode: SslMode,
        url_key: String,
        url_mode: SslMode,
    },
    #[error(
        "{key} and the sslrootcert= of {url_key} name different files: set the CA in one place"
    )]
    RootCertsDisagree { key: String, url_key: String },
    #[error(
        "sslmode {mode} checks the server's certificate against a CA: set {key} to the CA's PEM \
         file (a provider's CA bundle, or /etc/ssl/certs/ca-certificates.crt for a public CA)"
    )]
    NoRootCert { mode: SslMode, key: String },
    #[error(
        "{key} is set but sslmode {mode} never checks the server's certificate: set {mode_key} = \
         \"verify-full\""
    )]
    RootCertUnused {
        key: String,
        mode: SslMode,
        mode_key: String,
    },
    #[error("{key}: cannot read the CA file {path:?}: {source}")]
    RootCertUnreadable {
        key: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{key}: the CA file {path:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    RootCertNotPem { key: String, path: String },
    #[error("{key} applies to PostgreSQL only, and {url_key} is not a postgres:// URL")]
    NotPostgres { key: String, url_key: String },
}

/// The TLS settings of one database, as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// The CA file's path.
    pub root_cert: Option<String>,
}

/// Resolves one database's TLS settings from its keys (`sslmode`, `ssl_root_cert`; empty means
/// unset) and its URL's parameters, and checks them: both given must agree; a CA file makes
/// `require` `verify-ca` (as in libpq) and is refused with `disable` and `prefer`, which would
/// ignore it; `verify-ca` and `verify-full` need one; it must be readable and hold a PEM
/// certificate. `None` when neither the keys nor the URL say anything (the driver's `prefer`).
///
/// A URL that does not parse is left to the URL's own validation.
pub fn resolve(
    url: &str,
    sslmode: &str,
    ssl_root_cert: &str,
    keys: Keys<'_>,
) -> Result<Option<PgTls>, TlsConfigError> {
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !postgres {
        for (key, value) in [(keys.sslmode, sslmode), (keys.ssl_root_cert, ssl_root_cert)] {
            if !value.is_empty() {
                return Err(TlsConfigError::NotPostgres {
                    key: key.to_owned(),
                    url_key: keys.url.to_owned(),
                });
            }
        }
        return Ok(None);
    }
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(None);
    };
    let (url_mode, url_root) = url_settings(&parsed);
    let url_mode = match url_mode {
        Some(text) => {
            Some(
                SslMode::parse(&text).ok_or_else(|| TlsConfigError::UnknownUrlMode {
                    url_key: keys.url.to_owned(),
                })?,
            )
        }
        None => None,
    };
    let key_mode = if sslmode.is_empty() {
        None
    } else {
        // The key takes libpq's lower-case names only.
        Some(
            SslMode::parse(sslmode)
                .filter(|m| m.as_str() == sslmode)
                .ok_or_else(|| TlsConfigError::UnknownMode {
                    key: keys.sslmode.to_owned(),
                })?,
        )
    };
    let url_root = url_root.filter(|v| !v.is_empty());
    let key_root = (!ssl_root_cert.is_empty()).then(|| ssl_root_cert.to_owned());

    let mode = match (key_mode, url_mode) {
        (Some(k), Some(u)) if k != u => {
            return Err(TlsConfigError::ModesDisagree {
                key: keys.sslmode.to_owned(),
                key_mode: k,
                url_key: keys.url.to_owned(),
                url_mode: u,
            })
        }
        (Some(m), _) | (None, Some(m)) => Some(m),
        (None, None) => None,
    };
    let root_cert = match (key_root, url_root) {
        (Some(k), Some(u)) if k != u => {
            return Err(TlsConfigError::RootCertsDisagree {
                key: keys.ssl_root_cert.to_owned(),
                url_key: keys.url.to_owned(),
            })
        }
        (Some(path), _) | (None, Some(path)) => Some(path),
        (None, None) => None,
    };
    if mode.is_none() && root_cert.is_none() {
        return Ok(None);
    }
    let mut mode = mode.unwrap_or(SslMode::Prefer);
    match (&root_cert, mode) {
        (Some(_), SslMode::Require) => mode = SslMode::VerifyCa,
        (Some(_), SslMode::Disable | SslMode::Prefer) => {
            return Err(TlsConfigError::RootCertUnused {
                key: keys.ssl_root_cert.to_owned(),
                mode,
                mode_key: keys.sslmode.to_owned(),
            })
        }
        (None, m) if m.verifies() => {
            return Err(TlsConfigError::NoRootCert {
                mode,
                key: keys.ssl_root_cert.to_owned(),
            })
        }
        _ => {}
    }
    if let Some(path) = &root_cert {
        check_root_cert(path, keys.ssl_root_cert)?;
    }
    Ok(Some(PgTls { mode, root_cert }))
}

/// The CA file is read once here so that a missing or wrong file is a config error, not a
/// connection failure later. (The driver reads it again on each new connection.)
fn check_root_cert(path: &str, key: &str) -> Result<(), TlsConfigError> {
    let text = std::fs::read(path).map_err(|source| TlsConfigError::RootCertUnreadable {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    if !String::from_utf8_lossy(&text).contains("-----BEGIN CERTIFICATE-----") {
        return Err(TlsConfigError::RootCertNotPem {
            key: key.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// `url` with its TLS parameters saying what `tls` says: unchanged when they already do;
/// otherwise the first `sslmode=` (or alias) and `sslrootcert=` (or alias) take the resolved
/// values in place, later ones are dropped, and missing ones are appended.
pub fn with_tls(url: &str, tls: &PgTls) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let (mode, root_cert) = url_settings(&parsed);
    if mode.as_deref().and_then(SslMode::parse) == Some(tls.mode) && root_cert == tls.root_cert {
        return url.to_owned();
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    let (mut mode_set, mut root_set) = (false, tls.root_cert.is_none());
    for (key, value) in parsed.query_pairs() {
        if MODE_PARAMS.contains(&key.as_ref()) {
            if !mode_set {
                pairs.push(("sslmode".to_owned(), tls.mode.as_str().to_owned()));
                mode_set = true;
            }
        } else if ROOT_CERT_PARAMS.contains(&key.as_ref()) {
            if let (false, Some(path)) = (root_set, &tls.root_cert) {
                pairs.push(("sslrootcert".to_owned(), path.clone()));
                root_set = true;
            }
        } else {
            pairs.push((key.into_owned(), value.into_owned()));
        }
    }
    if !mode_set {
        pairs.push(("sslmode".to_owned(), tls.mode.as_str().to_owned()));
    }
    if let (false, Some(path)) = (root_set, &tls.root_cert) {
        pairs.push(("sslrootcert".to_owned(), path.clone()));
    }
    parsed.query_pairs_mut().clear().extend_pairs(pairs);
    parsed.to_string()
}

/// The URL's mode and CA file as the driver reads them: the last occurrence of each.
fn url_settings(url: &url::Url) -> (Option<String>, Option<String>) {
    let last = |names: &[&str]| {
        url.query_pairs()
            .filter(|(k, _)| names.contains(&k.as_ref()))
            .last()
            .map(|(_, v)| v.into_owned())
    };
    (last(MODE_PARAMS), last(ROOT_CERT_PARAMS))
}

/// Whether a PostgreSQL URL sets the mode itself (otherwise the pool sets `prefer`, so that the
/// environment's `PGSSLMODE` does not choose for it behind the config's back).
pub fn url_sets_mode(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        u.query_pairs()
            .any(|(k, _)| MODE_PARAMS.contains(&k.as_ref()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: Keys<'static> = Keys {
        url: "url",
        sslmode: "sslmode",
        ssl_root_cert: "ssl_root_cert",
    };

    fn ca_file() -> String {
        let path = std::env::temp_dir().join(format!("switchyard-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("temp file");
        path.display().to_string()
    }

    #[test]
    fn nothing_set_is_nothing_to_do() {
        assert_eq!(resolve("postgres://h/db", "", "", KEYS).ok(), Some(None));
        assert_eq!(resolve("sqlite://a.db", "", "", KEYS).ok(), Some(None));
    }

    #[test]
    fn keys_and_url_resolve_alike_and_must_agree() {
        let ca = ca_file();
        let full = Some(PgTls {
            mode: SslMode::VerifyFull,
            root_cert: Some(ca.clone()),
        });
        let by_keys = resolve("postgres://h/db", "verify-full", &ca, KEYS).expect("valid");
        let in_url = format!("postgres://h/db?sslmode=verify-full&sslrootcert={ca}");
        let by_url = resolve(&in_url, "", "", KEYS).expect("valid");
        let both = resolve(&in_url, "verify-full", &ca, KEYS).expect("agree");
        assert_eq!(by_keys, full);
        assert_eq!(by_url, full);
        assert_eq!(both, full);
        let aliases = format!("postgres://h/db?ssl-mode=verify-full&ssl-ca={ca}");
        assert_eq!(resolve(&aliases, "", "", KEYS).expect("valid"), full);

        let err = resolve(&in_url, "require", "", KEYS).expect_err("modes differ");
        assert!(matches!(err, TlsConfigError::ModesDisagree { .. }), "{err}");
        let err = resolve(&in_url, "", "/other/ca.pem", KEYS).expect_err("files differ");
        assert!(
            matches!(err, TlsConfigError::RootCertsDisagree { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("ssl_root_cert"), "{err}");
    }

    #[test]
    fn a_ca_file_is_needed_by_the_verifying_modes_only() {
        let ca = ca_file();
        for mode in ["verify-ca", "verify-full"] {
            let err = resolve("postgres://h/db", mode, "", KEYS).expect_err(mode);
            assert!(err.to_string().contains("set ssl_root_cert"), "{err}");
        }
        // libpq's rule: require with a CA file checks the chain.
        let tls = resolve("postgres://h/db?sslmode=require", "", &ca, KEYS).expect("valid");
        assert_eq!(tls.map(|t| t.mode), Some(SslMode::VerifyCa));
        for mode in ["disable", "prefer", ""] {
            let err = resolve("postgres://h/db", mode, &ca, KEYS).expect_err(mode);
            assert!(
                matches!(err, TlsConfigError::RootCertUnused { .. }),
                "{err}"
            );
        }
        for mode in ["disable", "prefer", "require"] {
            let tls = resolve("postgres://h/db", mode, "", KEYS).expect(mode);
            assert_eq!(tls.map(|t| t.mode.as_str()), Some(mode));
        }
    }

    #[test]
    fn bad_modes_files_and_backends_are_named() {
        for mode in ["allow", "verify_full", "Verify-Full", "on"] {
            let err = resolve("postgres://h/db", mode, "", KEYS).expect_err(mode);
            assert!(err.to_string().starts_with("sslmode must be"), "{err}");
        }
        let err = resolve("postgres://h/db?sslmode=allow", "", "", KEYS).expect_err("allow");
        assert!(err.to_string().contains("the sslmode= of url"), "{err}");
        let missing = "/nonexistent/switchyard/ca.pem";
        let err = resolve("postgres://h/db", "verify-full", missing, KEYS).expect_err("missing");
        assert!(
            matches!(err, TlsConfigError::RootCertUnreadable { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(missing), "{err}");
        let not_pem = ca_file() + ".txt";
        std::fs::write(&not_pem, "hello").expect("temp file");
        let err = resolve("postgres://h/db", "verify-full", &not_pem, KEYS).expect_err("not pem");
        assert!(
            matches!(err, TlsConfigError::RootCertNotPem { .. }),
            "{err}"
        );
        let err = resolve("sqlite://a.db", "require", "", KEYS).expect_err("sqlite");
        assert!(matches!(err, TlsConfigError::NotPostgres { .. }), "{err}");
    }

    #[test]
    fn the_url_carries_the_resolved_settings_and_keeps_the_rest() {
        let tls = PgTls {
            mode: SslMode::VerifyFull,
            root_cert: Some("/etc/switchyard/ca.pem".to_owned()),
        };
        let url = with_tls(
            "postgres://u:p%40ss@h:5432/db?application_name=x&ssl-mode=require&sslrootcert=/old&password=a%26b",
            &tls,
        );
        assert_eq!(
            url,
            "postgres://u:p%40ss@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fswitchyard%2Fca.pem&password=a%26b"
        );
        // A URL that already says it is left as written.
        let written = "postgres://h/db?ssl-mode=VERIFY-FULL&ssl-ca=/etc/switchyard/ca.pem";
        assert_eq!(with_tls(written, &tls), written);
        let appended = with_tls("postgres://h/db?sslmode=verify-full", &tls);
        assert_eq!(
            appended,
            "postgres://h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fswitchyard%2Fca.pem"
        );
        assert!(url_sets_mode(&url));
        assert!(!url_sets_mode("postgres://h/db?application_name=x"));
        let again = resolve(&url, "verify-full", "/etc/switchyard/ca.pem", KEYS);
        assert!(matches!(
            again,
            Err(TlsConfigError::RootCertUnreadable { .. })
        ));
    }
}
