//! A private PostgreSQL cluster for one test: `initdb` in a temporary folder, `pg_ctl start` on
//! a random port, so a test can restart (or stop) its database server without touching the
//! shared one on :5432 that other tests use. Stopped (immediately) and removed when dropped.
//!
//! The binaries are found in `SWITCHYARD_TEST_PG_BIN`, by default in the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian's layout; 15 on the development machine). PostgreSQL refuses to run as root: when the test runs as
//! root, the cluster's folder is handed to the `postgres` OS user and every command runs as it
//! (`runuser -u postgres --`).

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
}

impl PgCluster {
    /// Initialises and starts a cluster on a free port of 127.0.0.1.
    pub fn start() -> Result<Self> {
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
        cluster.pg_ctl(&["start"])?;
        Ok(cluster)
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a database with a unique name starting with `label`; returns its URL.
    pub async fn create_db(&self, label: &str) -> Result<String> {
        let name = format!("sy_{label}_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
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
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c shared_buffers=32MB -c max_connections=50",
            self.port,
            self.data.display()
        );
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
