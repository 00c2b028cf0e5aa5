//! `nats-server` with JetStream on free ports.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use tempfile::TempDir;

use crate::http::http_get;
use crate::process::{ManagedProcess, StartFailure, retry_on_port_clash};

/// A running `nats-server -js` with its store in a temporary directory; stopped on drop.
///
/// The binary is `nats-server` from `PATH`, or `$VAAS_NATS_SERVER`.
#[derive(Debug)]
pub struct Nats {
    // Declared before `dir` so the process stops before its directory is removed.
    process: ManagedProcess,
    port: u16,
    monitor_port: u16,
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
        let port = crate::free_port();
        let monitor_port = crate::free_port();
        let binary = std::env::var_os("VAAS_NATS_SERVER").unwrap_or_else(|| "nats-server".into());
        let mut command = Command::new(binary);
        command
            .arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &port.to_string()])
            .args(["-m", &monitor_port.to_string()])
            .arg("-sd")
            .arg(dir.path().join("jetstream"));
        let process = ManagedProcess::spawn(
            format!("nats-server :{port}"),
            command,
            &dir.path().join("nats.log"),
            "TERM",
        )?;
        let mut nats = Nats {
            process,
            port,
            monitor_port,
            dir,
        };
        let monitor = nats.monitor_addr();
        nats.process
            .wait_ready("healthz?js-enabled=true answers 200", || async move {
                healthz(monitor)
                    .await
                    .is_ok_and(|(status, _)| status == 200)
            })
            .await?;
        Ok(nats)
    }

    /// Returns the client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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

async fn healthz(monitor: SocketAddr) -> anyhow::Result<(u16, String)> {
    let response = http_get(monitor, "/healthz?js-enabled=true", "127.0.0.1").await?;
    Ok((response.status, response.body))
}

#[cfg(test)]
mod tests {
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
