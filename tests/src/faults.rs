//! Fault injection: [`TcpGate`], a TCP forwarder in front of a database that delays, stalls,
//! blackholes, resets, refuses, or cuts a connection right after a `COMMIT`; and [`pgcluster`],
//! a private PostgreSQL server a test may restart or stop.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::*;

pub mod pgcluster;

/// What a [`TcpGate`] does with traffic, set on command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Forward everything.
    Pass,
    /// Forward everything, each chunk held back this long (in both directions).
    Latency(Duration),
    /// Accept and hold, forward nothing; what was sent moves on when the mode changes back
    /// (a stalled network or a frozen server).
    Stall,
    /// Accept, then read and silently drop everything, in both directions (a firewall that
    /// drops packets). Leaving it cuts every connection it touched, as the peers' timeouts
    /// eventually would.
    Blackhole,
    /// Refuse new connections (accept and close at once).
    Closed,
}

/// A TCP forwarder in front of a database that injects faults on command: latency, stall,
/// blackhole, reset of the open connections, refusing connections, and a connection cut
/// right after it forwarded a PostgreSQL `COMMIT` ([`TcpGate::cut_after_next_commit`]).
#[derive(Debug)]
pub struct TcpGate {
    pub port: u16,
    mode: tokio::sync::watch::Sender<GateMode>,
    generation: tokio::sync::watch::Sender<u64>,
    commit_cut: Arc<CommitCut>,
    task: tokio::task::JoinHandle<()>,
}

/// The gate's `COMMIT` trap: armed on command, spent by the first connection that sends one.
#[derive(Debug, Default)]
struct CommitCut {
    armed: AtomicBool,
    done: AtomicUsize,
}

/// Follows what a PostgreSQL client sends (the untyped startup messages, then typed ones) far
/// enough to see where a `COMMIT` ends: a simple-protocol `Query` whose text is `COMMIT`, or an
/// extended-protocol `Parse` of `COMMIT` up to the `Sync` that runs it.
#[derive(Debug, Default)]
struct PgClientStream {
    /// Bytes of the message being read that came in earlier chunks (already forwarded).
    pending: Vec<u8>,
    started: bool,
    commit_parsed: bool,
}

impl PgClientStream {
    /// Feeds `chunk`; answers the offset in it just past the end of the first `COMMIT` that
    /// completes in it.
    fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let before = self.pending.len();
        self.pending.extend_from_slice(chunk);
        let mut at = 0;
        let mut found = None;
        loop {
            let rest = &self.pending[at..];
            let (header, typed) = if self.started { (5, true) } else { (4, false) };
            if rest.len() < header {
                break;
            }
            let len_at = usize::from(typed);
            let len = u32::from_be_bytes([
                rest[len_at],
                rest[len_at + 1],
                rest[len_at + 2],
                rest[len_at + 3],
            ]) as usize;
            let total = len + len_at;
            if rest.len() < total {
                break;
            }
            let message = &rest[..total];
            if typed {
                let body = &message[5..];
                let is_commit = |text: &[u8]| {
                    let text = String::from_utf8_lossy(text);
                    text.trim_matches(|c: char| c == '\0' || c.is_whitespace() || c == ';')
                        .eq_ignore_ascii_case("commit")
                };
                let commit_ends_here = match message[0] {
                    b'Q' => is_commit(body),
                    b'P' => {
                        // name\0 query\0 …
                        let mut parts = body.split(|b| *b == 0);
                        let _name = parts.next();
                        self.commit_parsed = parts.next().is_some_and(is_commit);
                        false
                    }
                    b'S' => std::mem::take(&mut self.commit_parsed),
                    _ => false,
                };
                if commit_ends_here && found.is_none() {
                    found = Some(at + total);
                }
            } else {
                // SSLRequest and GSSENCRequest keep the stream in its startup phase.
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                self.started = !(len == 8 && (code == 80_877_103 || code == 80_877_104));
            }
            at += total;
        }
        self.pending.drain(..at);
        found.and_then(|end| end.checked_sub(before))
    }
}

impl TcpGate {
    /// Forwards a random local port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, _) = tokio::sync::watch::channel(GateMode::Pass);
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let upstream = upstream.to_owned();
        let (mode2, generation2) = (mode.clone(), generation.clone());
        let commit_cut = Arc::new(CommitCut::default());
        let commit_cut2 = Arc::clone(&commit_cut);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                let now = *mode2.borrow();
                if now == GateMode::Closed {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = generation2.subscribe();
                let modes = mode2.subscribe();
                let commit_cut = Arc::clone(&commit_cut2);
                tokio::spawn(async move {
                    let server = if now == GateMode::Blackhole {
                        None // nothing reaches the server while blackholed
                    } else {
                        match tokio::net::TcpStream::connect(&upstream).await {
                            Ok(server) => Some(server),
                            Err(_) => return,
                        }
                    };
                    let (client_read, client_write) = client.into_split();
                    match server {
                        Some(server) => {
                            let _ = server.set_nodelay(true);
                            let (server_read, server_write) = server.into_split();
                            let cutting = Arc::new(AtomicBool::new(false));
                            let upstream_side = Watch {
                                commit_cut: Some(commit_cut),
                                cutting: Arc::clone(&cutting),
                                reset: Some(cut.clone()),
                            };
                            let downstream_side = Watch {
                                commit_cut: None,
                                cutting,
                                reset: Some(cut.clone()),
                            };
                            tokio::select! {
                                () = pump(client_read, Some(server_write), modes.clone(), upstream_side) => {}
                                () = pump(server_read, Some(client_write), modes, downstream_side) => {}
                                _ = cut.changed() => {}
                            }
                        }
                        None => {
                            tokio::select! {
                                () = pump(client_read, None, modes, Watch::default()) => {}
                                _ = cut.changed() => {}
                            }
                            drop(client_write);
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            mode,
            generation,
            commit_cut,
            task,
        })
    }

    /// The next connection that sends a `COMMIT` has it forwarded to the server and is cut
    /// at once, before the server's answer can come back: the client cannot tell whether its
    /// transaction committed. Once only; later connections pass.
    pub fn cut_after_next_commit(&self) {
        self.commit_cut.armed.store(true, Ordering::SeqCst);
    }

    /// How many connections were cut after their `COMMIT`.
    pub fn commit_cuts(&self) -> usize {
        self.commit_cut.done.load(Ordering::SeqCst)
    }

    /// Sets the mode. Leaving `Blackhole` cuts every open connection.
    pub fn set(&self, mode: GateMode) {
        let before = self.mode.send_replace(mode);
        if before == GateMode::Blackhole && mode != GateMode::Blackhole {
            self.reset();
        }
    }

    pub fn mode(&self) -> GateMode {
        *self.mode.borrow()
    }

    /// Cuts every open connection now; new ones are accepted as the mode says.
    pub fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Refuses new connections and cuts the open ones.
    pub fn close(&self) {
        self.set(GateMode::Closed);
        self.reset();
    }

    /// Back to forwarding everything.
    pub fn open(&self) {
        self.set(GateMode::Pass);
    }

    /// `url` (a PostgreSQL URL on 127.0.0.1:5432) rewritten to go through this gate, in
    /// cleartext (`sslmode=disable`): the `COMMIT` trap reads the PostgreSQL stream, which TLS
    /// would hide (the test server offers TLS, and the default `prefer` takes it).
    pub fn url(&self, url: &str) -> String {
        let gated = url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port), 1);
        let separator = if gated.contains('?') { '&' } else { '?' };
        format!("{gated}{separator}sslmode=disable")
    }
}

/// What one direction of a connection watches for: the client's side follows the PostgreSQL
/// stream for the `COMMIT` trap; both stop forwarding once the connection is being cut, by
/// the trap or by [`TcpGate::reset`] (`reset`, seen before each chunk is forwarded, so no byte
/// sent after `reset` returned gets through).
#[derive(Debug, Default)]
struct Watch {
    commit_cut: Option<Arc<CommitCut>>,
    cutting: Arc<AtomicBool>,
    reset: Option<tokio::sync::watch::Receiver<u64>>,
}

/// Moves bytes from `from` to `to` as the gate's mode says, until either side closes. `to` is
/// `None` for a connection accepted while blackholed (it has no server).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: Option<tokio::net::tcp::OwnedWriteHalf>,
    mut modes: tokio::sync::watch::Receiver<GateMode>,
    watch: Watch,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let mut stream = PgClientStream::default();
    loop {
        // A stalled gate reads nothing either, so the sender's buffers fill up as on a real
        // stalled network.
        while *modes.borrow_and_update() == GateMode::Stall {
            if modes.changed().await.is_err() {
                return;
            }
        }
        let mut n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if watch.cutting.load(Ordering::SeqCst) {
            return; // the other direction forwarded a COMMIT: nothing more either way
        }
        if watch
            .reset
            .as_ref()
            .is_some_and(|reset| reset.has_changed().unwrap_or(true))
        {
            return; // reset: the connection's task drops both halves
        }
        let mut cut_now = false;
        if let Some(trap) = &watch.commit_cut {
            if let Some(end) = stream.feed(&buf[..n]) {
                if trap.armed.swap(false, Ordering::SeqCst) {
                    watch.cutting.store(true, Ordering::SeqCst);
                    n = end;
                    cut_now = true;
                }
            }
        }
        loop {
            let mode = *modes.borrow_and_update();
            match mode {
                GateMode::Stall => {
                    if modes.changed().await.is_err() {
                        return;
                    }
                }
                GateMode::Blackhole => break, // dropped
                GateMode::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    let Some(to) = to.as_mut() else { break };
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
                GateMode::Pass | GateMode::Closed => {
                    let Some(to) = to.as_mut() else { break };
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
        if cut_now {
            if let (Some(trap), Some(to)) = (&watch.commit_cut, to.as_mut()) {
                let _ = to.flush().await;
                trap.done.fetch_add(1, Ordering::SeqCst);
            }
            return; // both halves are dropped: the server has the COMMIT, the client no answer
        }
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}
