//! `nats-server` with JetStream and password authentication on free ports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use tempfile::TempDir;

use crate::http::http_get;
use crate::process::{ManagedProcess, StartFailure, retry_on_port_clash};

/// The only user of a test server.
const USER: &str = "vaas";

/// A running `nats-server -js` with its store in a temporary directory; stopped on drop.
///
/// Clients must log in as [`Nats::user`] with [`Nats::password`] (random per server, also in
/// [`Nats::password_file`]); anonymous clients are refused. The monitoring endpoint needs no
/// login. The binary is `nats-server` from `PATH`, or `$VAAS_NATS_SERVER`.
#[derive(Debug)]
pub struct Nats {
    // Declared before `dir` so the process stops before its directory is removed.
    process: ManagedProcess,
    port: u16,
    monitor_port: u16,
    password: String,
    dir: TempDir,
}

impl Nats {
    /// Starts a server and waits until `/healthz?js-enabled=true` answers 200.
    pub async fn start() -> anyhow::Result<Nats> {
        retry_on_port_clash("nats-server", Nats::try_start).await
    }

    async fn try_start() -> Result<Nats, StartFailure> {
        let dir = tempfile::Builder::new()
            .prefix("vaas-nats-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let password = random_password().context("cannot read /dev/urandom")?;
        let config = dir.path().join("nats.conf");
        // The password is hex, so it needs no escaping inside the quotes.
        std::fs::write(
            &config,
            format!("authorization {{\n  user: {USER}\n  password: \"{password}\"\n}}\n"),
        )
        .context("cannot write nats.conf")?;
        write_owner_only(&dir.path().join(PASSWORD_FILE), &format!("{password}\n"))
            .context("cannot write the password file")?;
        let port = crate::free_port();
        let monitor_port = crate::free_port();
        let process = spawn(dir.path(), port, monitor_port)?;
        let mut nats = Nats {
            process,
            port,
            monitor_port,
            password,
            dir,
        };
        nats.wait_ready().await?;
        Ok(nats)
    }

    /// Waits until `/healthz?js-enabled=true` answers 200.
    async fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let monitor = self.monitor_addr();
        self.process
            .wait_ready("healthz?js-enabled=true answers 200", || async move {
                healthz(monitor)
                    .await
                    .is_ok_and(|(status, _)| status == 200)
            })
            .await
    }

    /// Stops the server (SIGTERM, SIGKILL after a grace period); its clients lose their
    /// connections. [`Nats::start_again`] brings it back on the same port.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Kills the server at once (SIGKILL), as a crash would; [`Nats::start_again`] brings it
    /// back on the same port.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts a stopped server again on the same ports with the same password and waits until
    /// it is healthy. With `wipe_data`, its JetStream store is deleted first: a NATS that comes
    /// back without its streams and consumers, as after losing its disk.
    pub async fn start_again(&mut self, wipe_data: bool) -> anyhow::Result<()> {
        self.process.stop();
        if wipe_data {
            match std::fs::remove_dir_all(self.store_dir()) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(error).context("cannot delete the JetStream store");
                }
                _ => {}
            }
        }
        self.process = spawn(self.dir.path(), self.port, self.monitor_port)?;
        self.wait_ready().await.map_err(|failure| match failure {
            StartFailure::PortTaken(error) | StartFailure::Fatal(error) => {
                error.context("cannot start nats-server again")
            }
        })
    }

    /// Returns the client URL, `nats://127.0.0.1:PORT` (without credentials).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Returns the user clients log in as.
    pub fn user(&self) -> &str {
        USER
    }

    /// Returns the user's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Returns the file holding the user's password followed by a newline (readable by the
    /// owner only), as `--nats-password-file` expects it.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join(PASSWORD_FILE)
    }

    /// Returns the client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the address of the HTTP monitoring endpoint.
    pub fn monitor_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.monitor_port))
    }

    /// Returns the status and body of `GET /healthz?js-enabled=true`.
    pub async fn healthz(&self) -> anyhow::Result<(u16, String)> {
        healthz(self.monitor_addr()).await
    }

    /// Returns the JetStream store directory.
    pub fn store_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Returns the temporary directory holding the store and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns everything the server logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Spawns `nats-server` with the configuration and store in `dir`, appending to its log there.
fn spawn(dir: &Path, port: u16, monitor_port: u16) -> anyhow::Result<ManagedProcess> {
    let binary = std::env::var_os("VAAS_NATS_SERVER").unwrap_or_else(|| "nats-server".into());
    let mut command = Command::new(binary);
    command
        .arg("-c")
        .arg(dir.join("nats.conf"))
        .arg("-js")
        .args(["-a", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .args(["-m", &monitor_port.to_string()])
        .arg("-sd")
        .arg(dir.join("jetstream"));
    ManagedProcess::spawn(
        format!("nats-server :{port}"),
        command,
        &dir.join("nats.log"),
        "TERM",
    )
}

/// Name of the password file in the server's directory.
const PASSWORD_FILE: &str = "nats-password";

/// Returns 16 random bytes from `/dev/urandom` as 32 hex digits.
fn random_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Creates `path` readable and writable by its owner only and writes `content` to it.
fn write_owner_only(path: &Path, content: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(content.as_bytes())
}

async fn healthz(monitor: SocketAddr) -> anyhow::Result<(u16, String)> {
    let response = http_get(monitor, "/healthz?js-enabled=true", "127.0.0.1").await?;
    Ok((response.status, response.body))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use async_nats::{ConnectErrorKind, ConnectOptions};

    use super::Nats;

    #[tokio::test]
    async fn starts_with_jetstream_and_reports_healthy() -> anyhow::Result<()> {
        let nats = Nats::start().await?;
        let (status, body) = nats.healthz().await?;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""status":"ok""#), "healthz said {body}");
        assert!(nats.url().starts_with("nats://127.0.0.1:"));
        assert!(nats.log().contains("Starting JetStream"), "{}", nats.log());
        Ok(())
    }

    #[tokio::test]
    async fn only_the_user_with_its_password_may_connect() -> anyhow::Result<()> {
        let nats = Nats::start().await?;
        let anonymous = async_nats::connect(nats.url()).await;
        let error = anonymous.expect_err("an anonymous client must be refused");
        assert_eq!(error.kind(), ConnectErrorKind::AuthorizationViolation);

        let wrong = ConnectOptions::with_user_and_password(nats.user().into(), "wrong".into())
            .connect(nats.url())
            .await;
        let error = wrong.expect_err("a wrong password must be refused");
        assert_eq!(error.kind(), ConnectErrorKind::AuthorizationViolation);

        let client =
            ConnectOptions::with_user_and_password(nats.user().into(), nats.password().into())
                .connect(nats.url())
                .await?;
        client.flush().await?;
        Ok(())
    }

    #[tokio::test]
    async fn the_password_file_holds_the_password_for_its_owner_only() -> anyhow::Result<()> {
        let nats = Nats::start().await?;
        assert_eq!(nats.password().len(), 32, "16 random bytes in hex");
        let content = std::fs::read_to_string(nats.password_file())?;
        assert_eq!(content, format!("{}\n", nats.password()));
        let mode = std::fs::metadata(nats.password_file())?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = Nats::start().await?;
        assert_ne!(nats.password(), other.password());
        Ok(())
    }

    #[tokio::test]
    async fn a_server_started_again_keeps_its_streams_unless_its_data_is_wiped()
    -> anyhow::Result<()> {
        let mut nats = Nats::start().await?;
        let connect = |nats: &Nats| {
            ConnectOptions::with_user_and_password(nats.user().into(), nats.password().into())
                .connect(nats.url())
        };
        let jetstream = async_nats::jetstream::new(connect(&nats).await?);
        jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: "KEPT".to_owned(),
                subjects: vec!["kept.>".to_owned()],
                ..Default::default()
            })
            .await?;
        let url = nats.url();

        nats.stop();
        assert!(nats.healthz().await.is_err(), "stopped");
        nats.start_again(false).await?;
        assert_eq!(nats.url(), url, "same port");
        let jetstream = async_nats::jetstream::new(connect(&nats).await?);
        jetstream.get_stream("KEPT").await?;

        nats.stop();
        nats.start_again(true).await?;
        let jetstream = async_nats::jetstream::new(connect(&nats).await?);
        assert!(jetstream.get_stream("KEPT").await.is_err(), "wiped");
        Ok(())
    }

    #[tokio::test]
    async fn two_servers_run_side_by_side_on_different_ports() -> anyhow::Result<()> {
        let first = Nats::start().await?;
        let second = Nats::start().await?;
        assert_ne!(first.url(), second.url());
        assert_eq!(second.healthz().await?.0, 200);
        drop(first);
        assert_eq!(second.healthz().await?.0, 200);
        Ok(())
    }
}
