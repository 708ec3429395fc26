//! The shell commands of README.md's tour and of docs/operations.md, extracted from the
//! documents (every ```sh block preceded by a `<!-- run -->` line) and run as written, in
//! order, in one bash session against fresh PostgreSQL databases on free ports. Each command
//! must exit 0, or the status its `# exits N` comment names.
//!
//! What the documents cannot say literally is substituted: the example config's database URLs
//! and ports, and (operations.md) `$ID`, `$T` and `$ADMIN_TOKEN`, which the test exports after
//! putting the migration in the state each section starts from. With
//! `SWITCHYARD_DOCS_CAPTURE=FILE` every command's output is written to FILE (for the outputs
//! the documents show).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use switchyard_tests::{
    bin, count_events, events_body, stream_url, wait_for_every, Backend, Env, Http, ProxyProcess,
    Result, ServeProcess, TempDir, TestDb,
};
use uuid::Uuid;

const MARKER: &str = "__SWITCHYARD_RC__";

/// A `## ` section of a document and the runnable commands of one block in it.
#[derive(Debug)]
struct Block {
    section: String,
    commands: Vec<String>,
}

/// Every ```sh block right after a `<!-- run -->` line, split into commands (a line, with its
/// `\` continuations; blank and comment lines dropped).
fn runnable_blocks(doc: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("## ") {
            section = line.trim_start_matches('#').trim().to_owned();
        }
        if line.trim() != "<!-- run -->" {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "a <!-- run --> marker must be followed by a ```sh block (section {section:?})"
        );
        let mut commands = Vec::new();
        let mut current = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            if current.is_empty() && (line.trim().is_empty() || line.trim().starts_with('#')) {
                continue;
            }
            current.push_str(line);
            if line.ends_with('\\') {
                current.push('\n');
            } else {
                commands.push(std::mem::take(&mut current));
            }
        }
        blocks.push(Block {
            section: section.clone(),
            commands,
        });
    }
    blocks
}

/// The exit status a command's `# exits N` comment names, else 0.
fn expected_exit(command: &str) -> i32 {
    command
        .split("# exits ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn substitute(text: &str, pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
}

/// One bash session in its own process group (killed whole, background jobs included).
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    capture: Vec<(String, String)>,
}

impl Shell {
    fn start(cwd: &Path, env: &[(String, String)]) -> Result<Self> {
        let bin_dir = bin("switchyard-control")
            .parent()
            .ok_or_else(|| anyhow!("no bin dir"))?
            .to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new("bash");
        command
            .args(["--noprofile", "--norc", "-s"])
            .current_dir(cwd)
            .env_clear()
            .env("PATH", path)
            .env(
                "HOME",
                std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
            )
            .env("USER", "docs-test")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shell = Self {
            child,
            stdin,
            lines,
            capture: Vec::new(),
        };
        shell.send("exec 2>&1")?;
        Ok(shell)
    }

    fn send(&mut self, text: &str) -> Result<()> {
        writeln!(self.stdin, "{text}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Runs `command`, checks its exit status, returns its output.
    fn run(&mut self, command: &str, timeout: Duration) -> Result<String> {
        self.send(command)?;
        self.send(&format!("printf '\\n{MARKER}%s\\n' $?"))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut output = Vec::new();
        let code: i32 = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).with_context(|| {
                format!(
                    "`{command}` did not finish within {timeout:?}; output so far:\n{}",
                    output.join("\n")
                )
            })?;
            if let Some(code) = line.strip_prefix(MARKER) {
                break code.trim().parse()?;
            }
            output.push(line);
        };
        if output.last().is_some_and(String::is_empty) {
            output.pop();
        }
        let output = output.join("\n");
        let expected = expected_exit(command);
        if code != expected {
            bail!("`{command}` exited {code}, documented {expected}; output:\n{output}");
        }
        self.capture.push((command.to_owned(), output.clone()));
        Ok(output)
    }

    fn export(&mut self, name: &str, value: &str) -> Result<()> {
        self.run(&format!("export {name}='{value}'"), Duration::from_secs(5))
            .map(|_| ())
    }

    /// Writes every command and its output to `$SWITCHYARD_DOCS_CAPTURE`, if set.
    fn save_capture(&self, label: &str) {
        if let Ok(path) = std::env::var("SWITCHYARD_DOCS_CAPTURE") {
            let mut text = String::new();
            for (command, output) in &self.capture {
                text.push_str(&format!("### {label}\n$ {command}\n{output}\n\n"));
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("capture file");
            let _ = file.write_all(text.as_bytes());
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

fn doc(name: &str) -> Result<String> {
    Ok(std::fs::read_to_string(format!(
        "{}/../{name}",
        env!("CARGO_MANIFEST_DIR")
    ))?)
}

/// A free local port (bound, then released).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The README's tour, with the example config pointed at fresh databases and free ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_runs_as_written() -> Result<()> {
    let readme = doc("README.md")?;
    let blocks = runnable_blocks(&readme);
    assert!(blocks.len() >= 4, "the tour's blocks are marked to run");
    let example = doc("deploy/examples/switchyard.toml")?;
    let (control, shared, dedicated) = (
        TestDb::create("tour_control").await?,
        TestDb::create("tour_shared").await?,
        TestDb::create("tour_dedicated").await?,
    );
    let dir = TempDir::new("tour")?;
    let config_path = dir.path.join("switchyard.toml");
    let mut pairs = vec![
        (
            "postgres://postgres@127.0.0.1:5432/switchyard_control".to_owned(),
            control.url.clone(),
        ),
        (
            "postgres://postgres@127.0.0.1:5432/events_shared".to_owned(),
            shared.url.clone(),
        ),
        (
            "postgres://postgres@127.0.0.1:5432/events_dedicated".to_owned(),
            dedicated.url.clone(),
        ),
    ];
    for port in ["7070", "7071", "7072"] {
        pairs.push((
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{}", free_port()?),
        ));
    }
    assert!(
        pairs
            .iter()
            .take(3)
            .all(|(from, _)| example.contains(from.as_str())),
        "the example config names the databases the tour creates"
    );
    std::fs::write(&config_path, substitute(&example, &pairs))?;
    pairs.push((
        "$PWD/deploy/examples/switchyard.toml".to_owned(),
        config_path.display().to_string(),
    ));

    let mut shell = Shell::start(&dir.path, &[])?;
    let mut outputs = Vec::new();
    for block in blocks.iter().filter(|b| b.section.contains("tour")) {
        for command in &block.commands {
            let command = substitute(command, &pairs);
            outputs.push(shell.run(&command, Duration::from_secs(60))?);
        }
    }
    shell.save_capture("README");
    let all = outputs.join("\n");
    // What the tour says happens, happened.
    assert!(all.contains("Cutover successful!"), "{all}");
    assert!(all.contains("\"store_id\":\"dedicated\""), "{all}");
    assert!(
        all.contains("\"state\":\"normal\",\"store_configured\":true,\"store_id\":\"dedicated\""),
        "the proxy routes the tenant to dedicated after the cutover: {all}"
    );
    assert!(all.contains("switchyard_proxy_requests_total{"), "{all}");
    assert!(all.contains("switchyard_control_"), "{all}");
    Ok(())
}

/// Waits until migration `id` is in `state`.
async fn wait_state(env: &Env, id: &str, state: &str) -> Result<()> {
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { Ok(env.control_json(&["status", id])?["state"] == state) },
    )
    .await
    .with_context(|| format!("migration {id} never reached {state}"))
}

/// Starts a migration of `tenant` to `to` for `serve` to drive and waits for dual_write.
async fn dual_writing(env: &Env, tenant: Uuid, to: &str) -> Result<String> {
    let started: Value = env.control_json(&[
        "migrate",
        "start",
        "--tenant",
        &tenant.to_string(),
        "--to",
        to,
        "--reset-target",
        "--detach",
    ])?;
    let id = started["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id: {started}"))?
        .to_owned();
    wait_state(env, &id, "dual_write").await?;
    Ok(id)
}

/// operations.md's procedures, in order, each from the state its section starts in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_procedures_run_as_written() -> Result<()> {
    let ops = doc("docs/operations.md")?;
    let blocks = runnable_blocks(&ops);
    let token = "docs-admin-token";
    let env = Env::new(
        Backend::Postgres,
        &["shared", "dedicated"],
        &format!("[proxy]\nadmin_token = \"{token}\"\nrouting_poll_ms = 200\n"),
    )
    .await?;
    env.control_json(&["init"])?;
    let http = Http::new();
    let proxy = ProxyProcess::spawn(&env.config_path, &[])?;
    proxy.wait_ready(&http).await?;
    let _serve = ServeProcess::spawn(&env.config_path, "docs", &[])?;
    let tenant = Uuid::new_v4();
    for _ in 0..5 {
        let reply = http
            .post(
                &stream_url(&proxy.data, tenant, "Order", Uuid::new_v4()),
                &events_body(Some(0), 20, "OrderPlaced"),
            )
            .await?;
        assert_eq!(reply.status, http::StatusCode::CREATED);
    }
    let admin_port = proxy.admin.trim_start_matches("http://").to_owned();
    let pairs = vec![("127.0.0.1:7071".to_owned(), admin_port)];
    let dir = TempDir::new("ops")?;
    let mut shell = Shell::start(
        &dir.path,
        &[
            (
                "SWITCHYARD_CONFIG".to_owned(),
                env.config_path.display().to_string(),
            ),
            ("T".to_owned(), tenant.to_string()),
            ("ADMIN_TOKEN".to_owned(), token.to_owned()),
        ],
    )?;

    let mut migrated = None;
    let mut reverted = None;
    let mut seen = Vec::new();
    for block in &blocks {
        let number = block
            .section
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        // The state each procedure starts from.
        match number.as_str() {
            "1" => shell.export("ID", &dual_writing(&env, tenant, "dedicated").await?)?,
            "5" => {
                let id = dual_writing(&env, tenant, "dedicated").await?;
                // The cutover is refused while the tail lags, as the section says: wait for it
                // as an operator would (dual_write is entered before the tail's first pass).
                caught_up(&env, &id).await?;
                shell.export("ID", &id)?;
                migrated = Some(id);
            }
            "8" if !seen.contains(&number) => {
                // Moving back to `shared`, which still holds the tenant's old events.
                shell.export("ID", &dual_writing(&env, tenant, "shared").await?)?;
            }
            "12" if !seen.contains(&number) => {
                // Section 11 finished the migration and emptied `shared` of the tenant.
                let id = migrated
                    .as_deref()
                    .ok_or_else(|| anyhow!("section 5 did not run"))?;
                section_11_finished(&env, tenant, id).await?;
                // The tenant, on `dedicated`, migrates to `shared` and cuts over: the cutover
                // the section undoes.
                let id = dual_writing(&env, tenant, "shared").await?;
                caught_up(&env, &id).await?;
                let cut = env.control_json(&["cutover", &id])?;
                assert_eq!(cut["success"], true, "{cut}");
                shell.export("ID", &id)?;
                reverted = Some(id);
            }
            "9" | "11" => shell.export(
                "ID",
                migrated
                    .as_deref()
                    .ok_or_else(|| anyhow!("section 5 did not run"))?,
            )?,
            _ => {}
        }
        seen.push(number.clone());
        for command in &block.commands {
            let command = substitute(command, &pairs);
            let output = shell.run(&command, Duration::from_secs(60))?;
            // Sections 2 and 3 leave the state they say; wait for the worker where it acts.
            if number == "3" {
                let id = shell.run("echo $ID", Duration::from_secs(5))?;
                wait_state(&env, id.trim(), "dual_write").await?;
            }
            if number == "8" && command.contains("resume-writes") {
                let reply: Value = serde_json::from_str(&output)?;
                assert_eq!(reply["state"], "normal", "{output}");
            }
        }
    }
    shell.save_capture("operations.md");
    for section in ["1", "2", "3", "4", "5", "7", "8", "9", "11", "12"] {
        assert!(
            seen.iter().any(|s| s == section),
            "section {section} has no runnable block"
        );
    }
    // Section 12 reverted the cutover it started from: the tenant lives in `dedicated` again.
    let id = reverted.ok_or_else(|| anyhow!("section 12 did not run"))?;
    let status = env.control_json(&["status", &id])?;
    assert_eq!(status["state"], "migrated", "{status}");
    assert!(status["reverted_by"].is_string(), "{status}");
    let route = env.control_json(&["routing", "get", &tenant.to_string()])?;
    assert_eq!(route["store_id"], "dedicated", "{route}");
    Ok(())
}

/// Section 11 finished migration `id` and emptied the store it left (`shared`) of the tenant.
async fn section_11_finished(env: &Env, tenant: Uuid, id: &str) -> Result<()> {
    let status = env.control_json(&["status", id])?;
    assert_eq!(status["state"], "migrated", "{status}");
    assert!(status["finished_at"].is_string(), "{status}");
    assert_eq!(status["cleanup"]["state"], "done", "{status}");
    assert_eq!(
        count_events(env.store_url("shared"), Some(tenant)).await?,
        0,
        "{status}"
    );
    Ok(())
}

/// Waits until migration `id` is dual-writing at lag 0, as an operator would before a cutover.
async fn caught_up(env: &Env, id: &str) -> Result<()> {
    wait_for_every(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let status = env.control_json(&["status", id])?;
            Ok(status["state"] == "dual_write" && status["lag"] == 0)
        },
    )
    .await
    .with_context(|| format!("migration {id} never caught up"))
}

/// The README's embedded-default block: no config, SQLite files in a fresh folder; only the
/// ports are moved (by the environment, as an operator would) to free ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_embedded_default_block_runs_as_written() -> Result<()> {
    let readme = doc("README.md")?;
    let blocks: Vec<Block> = runnable_blocks(&readme)
        .into_iter()
        .filter(|b| b.section.contains("embedded default"))
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "the embedded-default block is marked to run"
    );
    let (data, admin) = (free_port()?, free_port()?);
    let pairs = vec![
        ("localhost:7070".to_owned(), format!("127.0.0.1:{data}")),
        ("localhost:7071".to_owned(), format!("127.0.0.1:{admin}")),
    ];
    let dir = TempDir::new("embedded")?;
    let mut shell = Shell::start(
        &dir.path,
        &[
            (
                "SWITCHYARD_PROXY_LISTEN".to_owned(),
                format!("127.0.0.1:{data}"),
            ),
            (
                "SWITCHYARD_PROXY_ADMIN_LISTEN".to_owned(),
                format!("127.0.0.1:{admin}"),
            ),
        ],
    )?;
    let mut outputs = Vec::new();
    for command in blocks.iter().flat_map(|b| &b.commands) {
        outputs.push(shell.run(&substitute(command, &pairs), Duration::from_secs(60))?);
    }
    shell.save_capture("README embedded");
    let all = outputs.join("\n");
    assert!(all.contains("Cutover successful!"), "{all}");
    assert!(
        all.contains("\"store_id\":\"dedicated\",\"first_version\":2"),
        "the append after the cutover landed on dedicated: {all}"
    );
    assert!(
        dir.path.join("switchyard-data/dedicated.db").exists(),
        "the embedded default's files are under ./switchyard-data"
    );
    Ok(())
}
