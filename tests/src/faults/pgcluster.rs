//! A private PostgreSQL cluster for one test: `initdb` in a temporary folder, `pg_ctl start` on
//! a random port, so a test can restart (or stop) its database server without touching the
//! shared one on :5432 that other tests use. Stopped (immediately) and removed when dropped.
//!
//! The binaries are found in `SWITCHYARD_TEST_PG_BIN`, by default in the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian's layout; 15 on the development machine). PostgreSQL refuses to run as root: when the test runs as
//! root, the cluster's folder is handed to the `postgres` OS user and every command runs as it
//! (`runuser -u postgres --`).
//!
//! [`PgCluster::start_tls`] starts one that speaks TLS only over TCP (`ssl = on`, and pg_hba
//! refuses cleartext), for the tests of `sslmode`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use sqlx::Connection;
use uuid::Uuid;

use crate::Result;

/// A running private PostgreSQL server (trust authentication, user `postgres`).
#[derive(Debug)]
pub struct PgCluster {
    pub port: u16,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    as_postgres: bool,
    /// Started with `ssl = on` (kept across restarts).
    tls: bool,
}

impl PgCluster {
    /// Initialises and starts a cluster on a free port of 127.0.0.1.
    pub fn start() -> Result<Self> {
        Self::init(None)
    }

    /// Like [`PgCluster::start`], with `ssl = on`, the certificate chain `cert_pem` and its key
    /// `key_pem`; pg_hba trusts TLS connections over TCP and rejects cleartext ones (`hostssl
    /// … trust`, `hostnossl … reject`).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::init(Some((cert_pem, key_pem)))
    }

    fn init(tls: Option<(&str, &str)>) -> Result<Self> {
        let root =
            std::env::temp_dir().join(format!("switchyard-pgcluster-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root)?;
        let as_postgres = is_root()?;
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&root))?;
        }
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let cluster = Self {
            port,
            data: root.join("data"),
            log: root.join("server.log"),
            root,
            as_postgres,
            tls: tls.is_some(),
        };
        cluster
            .tool("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .arg("--pgdata")
            .arg(&cluster.data)
            .stdout(Stdio::null())
            .status()
            .context("running initdb")?
            .success()
            .then_some(())
            .context("initdb failed")?;
        if let Some((cert_pem, key_pem)) = tls {
            cluster.write_tls_files(cert_pem, key_pem)?;
        }
        cluster.pg_ctl(&["start"])?;
        Ok(cluster)
    }

    /// `server.crt` and `server.key` (PostgreSQL's default `ssl_cert_file` and `ssl_key_file`,
    /// in the data folder) and a pg_hba that takes TLS only over TCP. The server refuses a key
    /// that others may read, so it is 0600 and the server's user owns all three files.
    fn write_tls_files(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let hba = "local all all trust\n\
                   hostssl all all 127.0.0.1/32 trust\n\
                   hostnossl all all 127.0.0.1/32 reject\n";
        let files = [
            ("server.crt", cert_pem),
            ("server.key", key_pem),
            ("pg_hba.conf", hba),
        ];
        for (name, text) in files {
            let path = self.data.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if self.as_postgres {
                run(Command::new("chown").arg("postgres:").arg(&path))?;
            }
        }
        Ok(())
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The URL of database `name` through the cluster's Unix socket (trusted, and never TLS:
    /// what a test uses to look at a TLS-only cluster from behind the server's back).
    pub fn socket_url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{name}?host={}",
            self.port,
            self.data.display()
        )
    }

    /// Creates a database with a unique name starting with `label`; returns its URL.
    pub async fn create_db(&self, label: &str) -> Result<String> {
        let name = format!("sy_{label}_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = sqlx::PgConnection::connect(&self.socket_url("postgres")).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(self.url(&name))
    }

    /// `pg_ctl restart -m fast`: every session is cut (open transactions roll back), the
    /// server shuts down cleanly and starts again; returns once it accepts connections.
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl(&["restart", "-m", "fast"])
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let mut options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c shared_buffers=32MB -c max_connections=50",
            self.port,
            self.data.display()
        );
        if self.tls {
            options.push_str(" -c ssl=on");
        }
        let out = self
            .tool("pg_ctl")
            .args(args)
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &options])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl")?;
        if !out.status.success() {
            bail!(
                "pg_ctl {args:?} failed: {}{}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }

    /// A command for one of the PostgreSQL binaries, as the `postgres` user when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = bin_dir().join(name);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.current_dir(&self.root);
        command
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `SWITCHYARD_TEST_PG_BIN`, or the newest installed `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SWITCHYARD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let bin = root.join(version.to_string()).join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max()
        .map_or_else(|| root.join("15/bin"), |(_, bin)| bin)
}

fn is_root() -> Result<bool> {
    let out = Command::new("id").arg("-u").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status()?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
