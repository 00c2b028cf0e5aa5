//! A throwaway PostgreSQL server on a free port.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, anyhow};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tracing::debug;

use crate::process::{ManagedProcess, StartFailure, retry_on_port_clash, run_to_completion};

/// A running PostgreSQL server with its own data directory, trusting every local TCP connection;
/// stopped on drop (fast shutdown).
///
/// The binaries come from `$VAAS_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else
/// `PATH`. As root, the server runs as the `postgres` OS user (PostgreSQL refuses to run as root).
/// `initdb` runs once per PostgreSQL version: its result is kept as a template under the
/// temporary directory and copied for each server.
#[derive(Debug)]
pub struct Postgres {
    // Declared before `dir` so the server stops before its directory is removed.
    process: ManagedProcess,
    port: u16,
    dir: TempDir,
}

/// Who runs the PostgreSQL binaries.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl Postgres {
    /// Starts a server and waits until it accepts TCP connections and `pg_isready` says so.
    pub async fn start() -> anyhow::Result<Postgres> {
        let bin = bin_dir();
        let run_as = run_as()?;
        let template = ensure_template(&bin, run_as).await?;
        retry_on_port_clash("postgres", || Postgres::try_start(&bin, run_as, &template)).await
    }

    async fn try_start(
        bin: &Option<PathBuf>,
        run_as: Option<RunAs>,
        template: &Path,
    ) -> Result<Postgres, StartFailure> {
        let dir = owned_tempdir("vaas-pg-", run_as)?;
        let data = dir.path().join("data");
        let mut copy = tokio::process::Command::new("cp");
        copy.arg("-a").arg(template).arg(&data);
        run_to_completion(copy).await?;

        let port = crate::free_port();
        let mut command = Command::new(binary(bin, "postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .current_dir(dir.path());
        if let Some(RunAs { uid, gid }) = run_as {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        // SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to disconnect.
        let process = ManagedProcess::spawn(
            format!("postgres :{port}"),
            command,
            &dir.path().join("postgres.log"),
            "INT",
        )?;
        let mut postgres = Postgres { process, port, dir };
        let addr = postgres.addr();
        let pg_isready = binary(bin, "pg_isready");
        postgres
            .process
            .wait_ready("accepts TCP and pg_isready succeeds", || {
                let pg_isready = pg_isready.clone();
                async move {
                    if TcpStream::connect(addr).await.is_err() {
                        return false;
                    }
                    let mut check = tokio::process::Command::new(pg_isready);
                    check.args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                    ]);
                    run_to_completion(check).await.is_ok()
                }
            })
            .await?;
        Ok(postgres)
    }

    /// Returns `postgres://postgres@127.0.0.1:PORT/postgres` (no password: trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Returns the TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the TCP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Returns the temporary directory holding the data directory, the socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns everything the server logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Returns `$VAAS_PG_BIN`, else the newest `/usr/lib/postgresql/<major>/bin`, else `None` (PATH).
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VAAS_PG_BIN") {
        return Some(dir.into());
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    versions
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

fn binary(bin: &Option<PathBuf>, name: &str) -> PathBuf {
    match bin {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// Returns the `postgres` OS user when running as root, `None` otherwise.
fn run_as() -> anyhow::Result<Option<RunAs>> {
    // The owner of /proc/self is this process's effective user.
    let euid = std::fs::metadata("/proc/self")
        .context("cannot read /proc/self")?
        .uid();
    if euid != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    let fields: Vec<&str> = passwd
        .lines()
        .find(|line| line.starts_with("postgres:"))
        .ok_or_else(|| {
            anyhow!("no `postgres` OS user: install PostgreSQL first (deploy/install.sh)")
        })?
        .split(':')
        .collect();
    let number = |index: usize| -> anyhow::Result<u32> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| anyhow!("bad /etc/passwd entry for postgres"))
    };
    Ok(Some(RunAs {
        uid: number(2)?,
        gid: number(3)?,
    }))
}

/// Creates a temporary directory owned by `run_as` (when given).
fn owned_tempdir(prefix: &str, run_as: Option<RunAs>) -> anyhow::Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("cannot create a temporary directory")?;
    if let Some(RunAs { uid, gid }) = run_as {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .with_context(|| format!("cannot chown {} to postgres", dir.path().display()))?;
    }
    Ok(dir)
}

/// Returns a data directory made by `initdb` for this PostgreSQL version, creating it once.
///
/// Concurrent callers may both run `initdb`; the first atomic rename wins and the others throw
/// their copy away, so no lock is needed and a half-made template is never visible.
async fn ensure_template(bin: &Option<PathBuf>, run_as: Option<RunAs>) -> anyhow::Result<PathBuf> {
    let mut version = tokio::process::Command::new(binary(bin, "postgres"));
    version.arg("--version");
    let version = run_to_completion(version)
        .await
        .context("cannot run postgres --version; is PostgreSQL installed? (deploy/install.sh)")?;
    let key: String = version
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let uid = run_as.map_or(0, |run_as| run_as.uid);
    let template = std::env::temp_dir().join(format!("vaas-testkit-pg-template-{key}-uid{uid}"));
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let build = owned_tempdir("vaas-pg-template-build-", run_as)?;
    let data = build.path().join("data");
    let mut initdb = tokio::process::Command::new(binary(bin, "initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(build.path());
    if let Some(RunAs { uid, gid }) = run_as {
        initdb.uid(uid).gid(gid);
    }
    debug!(template = %template.display(), "running initdb for the template data directory");
    run_to_completion(initdb).await.context("initdb failed")?;
    if let Err(error) = std::fs::rename(&data, &template) {
        // Another test won the race; its template is as good as ours.
        if !template.join("PG_VERSION").exists() {
            return Err(error).with_context(|| format!("cannot create {}", template.display()));
        }
    }
    Ok(template)
}

#[cfg(test)]
mod tests {
    use super::Postgres;

    #[tokio::test]
    async fn accepts_connections_with_trust_authentication() -> anyhow::Result<()> {
        let postgres = Postgres::start().await?;
        assert!(postgres.url().starts_with("postgres://postgres@127.0.0.1:"));
        tokio::net::TcpStream::connect(postgres.addr()).await?;
        // A real SQL round trip over TCP, as a client of the store would do it.
        let output = tokio::process::Command::new("psql")
            .arg(postgres.url())
            .args(["-X", "-A", "-t", "-c", "select 40 + 2"])
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.trim(), "42");
        Ok(())
    }

    #[tokio::test]
    async fn two_servers_have_separate_data() -> anyhow::Result<()> {
        let (first, second) = tokio::try_join!(Postgres::start(), Postgres::start())?;
        assert_ne!(first.port(), second.port());
        assert_ne!(first.dir(), second.dir());
        Ok(())
    }
}
