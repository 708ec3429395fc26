//! The one classification of failures every Switchyard program shares.
//!
//! Each error of the store (and of the engine and the proxy above it) says which
//! [`ErrorKind`] it is: the proxy turns the kind into an HTTP status in one place
//! (`proxy/src/error.rs`), the CLI into a refusal or a failure, the engine into a retry or a
//! stop. [`StoreError`] is the store's own: a failure to talk to a database, or a database
//! answering something it should not.

/// The coarse class of a failure: who can fix it, and whether the same request can succeed
/// later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request cannot succeed as asked (unknown id, illegal action, values no store can
    /// hold, bad arguments): HTTP 4xx.
    Client,
    /// Someone else got there first or holds what was asked for; re-read and decide again:
    /// HTTP 409.
    Conflict,
    /// A database or a peer is unreachable or busy; the same request may succeed later:
    /// HTTP 503 with `Retry-After`.
    Unavailable,
    /// A bug or a state that should not exist: HTTP 500, details logged and never sent.
    Internal,
}

impl ErrorKind {
    /// Whether the same request, later, can help.
    pub fn is_retryable(self) -> bool {
        self == Self::Unavailable
    }

    /// Whether the caller was refused (as opposed to something failing).
    pub fn is_refusal(self) -> bool {
        matches!(self, Self::Client | Self::Conflict)
    }

    /// The name metrics and JSON replies use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client_error",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// A failure to talk to a store, or a store answering something it should not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("store query failed: {0}")]
    Query(#[source] sqlx::Error),
    #[error("store holds a malformed row: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Url(#[from] crate::url::UrlError),
    /// A lock (a tenant's fence) stayed held by another session past the wait: who holds it.
    #[error("{0}")]
    Held(String),
}

impl StoreError {
    /// A call that got no answer within `limit`: the database went silent (a failover behind
    /// the same address, a frozen server) without closing its connections.
    pub fn timed_out(limit: std::time::Duration) -> Self {
        Self::Unavailable(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} ms", limit.as_millis()),
        )))
    }

    /// An unavailability known only by its description (passed on from another caller's
    /// attempt, say).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(sqlx::Error::Protocol(message.into()))
    }

    /// Unavailable: the database could not be reached or was busy (a retry can help).
    /// Client: the values or the URL given can never work (SQLSTATE class 22 or 54, a bad
    /// URL). Conflict: another session held what this one waited for. Internal: any other
    /// refusal, or a row this crate cannot read.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::Query(_) if self.is_unstorable_value() => ErrorKind::Client,
            Self::Url(_) => ErrorKind::Client,
            Self::Held(_) => ErrorKind::Conflict,
            Self::Query(_) | Self::Corrupt(_) => ErrorKind::Internal,
        }
    }

    /// Whether a retry (of the same request, later) can help.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// The SQLSTATE of a database's refusal.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Self::Query(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Whether the database refused the values themselves: SQLSTATE class 22 (data exception:
    /// a character the database's encoding lacks, a number out of range, invalid JSON) or 54
    /// (a program limit, such as JSON nested past `max_stack_depth`). The same request can
    /// never succeed on this store.
    pub fn is_unstorable_value(&self) -> bool {
        self.sqlstate()
            .is_some_and(|c| c.len() == 5 && (c.starts_with("22") || c.starts_with("54")))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Self::Unavailable(e),
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| {
                    // 57P01 admin shutdown, 57P03 cannot connect now, 08xxx connection
                    // exceptions, 53300 too many connections; SQLite 5/6: busy/locked.
                    c.starts_with("08")
                        || c == "57P01"
                        || c == "57P03"
                        || c == "53300"
                        || c == "5"
                        || c == "6"
                        || c == "517"
                }) =>
            {
                Self::Unavailable(e)
            }
            other => Self::Query(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database's refusal with a given SQLSTATE (SQLite reports its result codes there).
    #[derive(Debug)]
    struct Refusal(&'static str);

    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused with {}", self.0)
        }
    }

    impl std::error::Error for Refusal {}

    impl sqlx::error::DatabaseError for Refusal {
        fn message(&self) -> &str {
            "refused"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn refused(sqlstate: &'static str) -> StoreError {
        sqlx::Error::Database(Box::new(Refusal(sqlstate))).into()
    }

    #[test]
    fn unreachable_or_busy_databases_are_unavailable_and_retryable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        for e in [
            StoreError::from(io),
            StoreError::from(sqlx::Error::PoolTimedOut),
            StoreError::from(sqlx::Error::PoolClosed),
            StoreError::from(sqlx::Error::WorkerCrashed),
            StoreError::timed_out(std::time::Duration::from_millis(300)),
            StoreError::unavailable("passed on"),
            // Connection exceptions, admin shutdown, cannot connect now, too many connections.
            refused("08006"),
            refused("08001"),
            refused("57P01"),
            refused("57P03"),
            refused("53300"),
            // SQLite: busy, locked, busy snapshot.
            refused("5"),
            refused("6"),
            refused("517"),
        ] {
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert!(e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn values_no_store_can_hold_are_the_clients() {
        // Data exceptions (invalid text, out of range, untranslatable character) and
        // program limits (JSON nested too deep).
        for sqlstate in ["22P02", "22003", "22P05", "54001"] {
            let e = refused(sqlstate);
            assert_eq!(e.kind(), ErrorKind::Client, "{sqlstate}");
            assert!(!e.is_retryable());
        }
        let url = StoreError::Url(crate::url::StoreUrl::parse("mysql://h/db").expect_err("bad"));
        assert_eq!(url.kind(), ErrorKind::Client);
    }

    #[test]
    fn a_lock_held_past_its_wait_is_a_conflict_and_other_refusals_are_internal() {
        assert_eq!(
            StoreError::Held("pid 7".to_owned()).kind(),
            ErrorKind::Conflict
        );
        // A unique violation, a missing table, a syntax error, a lock timeout: bugs or states
        // the code handles before they get here.
        for sqlstate in ["23505", "42P01", "42601", "55P03", "2"] {
            let e = refused(sqlstate);
            assert_eq!(e.kind(), ErrorKind::Internal, "{sqlstate}");
            assert!(!e.is_retryable());
        }
        assert_eq!(
            StoreError::Corrupt("bad row".to_owned()).kind(),
            ErrorKind::Internal
        );
    }

    #[test]
    fn only_unavailable_is_retryable_and_only_client_and_conflict_are_refusals() {
        use ErrorKind::{Client, Conflict, Internal, Unavailable};
        let retryable: Vec<_> = [Client, Conflict, Unavailable, Internal]
            .into_iter()
            .filter(|k| k.is_retryable())
            .collect();
        assert_eq!(retryable, [Unavailable]);
        let refusals: Vec<_> = [Client, Conflict, Unavailable, Internal]
            .into_iter()
            .filter(|k| k.is_refusal())
            .collect();
        assert_eq!(refusals, [Client, Conflict]);
    }
}
