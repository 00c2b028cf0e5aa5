//! `varnishd` (manager only, no VCL loaded) on free ports.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::process::{ManagedProcess, StartFailure, retry_on_port_clash, run_to_completion};

/// The parameters every VaaS varnishd runs with (hardening and compiler flags), one flag and
/// its value a line: the file `deploy/start.sh` uses, so tests run against the deploy's varnishd.
pub const DEPLOY_PARAMS: &str = include_str!("../../../deploy/varnishd.params");

/// Returns the deploy's `cc_command` (from [`DEPLOY_PARAMS`]).
pub fn deploy_cc_command() -> &'static str {
    DEPLOY_PARAMS
        .lines()
        .find_map(|line| line.strip_prefix("-p cc_command="))
        .expect("deploy/varnishd.params sets cc_command")
}

/// Returns `command` with its optimisation flag (`-O…`) replaced by `flags` (for example
/// "-O0", or "-g -O2" for the stock command).
pub fn cc_command_with(command: &str, flags: &str) -> String {
    command
        .split(' ')
        .map(|word| if word.starts_with("-O") { flags } else { word })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Returns the arguments of [`DEPLOY_PARAMS`], except that `cc_command` stays writable: the
/// reload benchmark changes it to measure other flags against the same varnishd.
fn deploy_arguments() -> Vec<&'static str> {
    DEPLOY_PARAMS
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| *line != "-r cc_command")
        .filter_map(|line| line.split_once(' '))
        .flat_map(|(flag, value)| [flag, value])
        .collect()
}

/// A running `varnishd -F -f ''` with its own `-n` directory, admin port and secret file;
/// stopped on drop.
///
/// Only the manager runs: the cache child starts once a VCL is loaded, made active and `start`
/// is sent on the admin port — that is the agent's job. `vcl_cooldown` is 1 second so discarded
/// VCLs go cold quickly. The binary is `varnishd` from `PATH`, or `$VAAS_VARNISHD`.
#[derive(Debug)]
pub struct Varnishd {
    // Declared before `dir` so varnishd stops before its directory is removed.
    process: ManagedProcess,
    http_port: u16,
    admin_port: u16,
    dir: TempDir,
}

impl Varnishd {
    /// Starts varnishd and waits until its admin port sends the 107 authentication challenge.
    pub async fn start() -> anyhow::Result<Varnishd> {
        retry_on_port_clash("varnishd", Varnishd::try_start).await
    }

    async fn try_start() -> Result<Varnishd, StartFailure> {
        let dir = tempfile::Builder::new()
            .prefix("vaas-varnishd-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        // As root varnishd drops to the users varnish and vcache: they must be able to reach the
        // directory and read what is in it (secret file, VCL files a test writes there).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{}\n", random_hex()?))?;
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644))?;

        let http_port = crate::free_port();
        let admin_port = crate::free_port();
        let process = spawn(dir.path(), http_port, admin_port)?;
        let mut varnishd = Varnishd {
            process,
            http_port,
            admin_port,
            dir,
        };
        varnishd.wait_ready().await?;
        Ok(varnishd)
    }

    /// Stops varnishd and starts it again as an operator's restart would: the same ports, `-n`
    /// directory and secret, and no VCL (`-f ''`), its child stopped. Returns once the admin port
    /// sends the 107 challenge.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.stop();
        self.process = spawn(self.dir.path(), self.http_port, self.admin_port)?;
        self.wait_ready().await.map_err(|failure| match failure {
            StartFailure::PortTaken(error) | StartFailure::Fatal(error) => {
                error.context("varnishd did not come back after its restart")
            }
        })
    }

    /// Kills varnishd (manager, cache child and any compiler it runs) at once, as a crash
    /// would; [`Varnishd::restart`] starts it again, empty.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes varnishd and whatever it runs (a VCL compile included) until
    /// [`Varnishd::resume`]: its admin port and HTTP listener stop answering.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Lets a paused varnishd run again.
    pub fn resume(&self) {
        self.process.resume();
    }

    /// Tells whether varnishd is compiling a VCL right now: a C compiler (`cc1`, `gcc`, `cc`)
    /// runs in its process group, as `vcl.inline` and `vcl.load` start one.
    pub fn compiling(&self) -> bool {
        let group = self.process.pid().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        entries.flatten().any(|entry| {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let command = head.split_once('(').map_or("", |(_, command)| command);
            let process_group = rest.split_whitespace().nth(2);
            process_group == Some(group.as_str()) && matches!(command, "cc1" | "gcc" | "cc")
        })
    }

    /// Waits until the admin port sends the 107 challenge.
    async fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let admin = self.admin_addr();
        self.process
            .wait_ready("admin port sends the 107 challenge", || async move {
                read_admin_greeting(admin)
                    .await
                    .is_ok_and(|(status, _)| status == 107)
            })
            .await
    }

    /// Returns the address of the HTTP listener (`-a`).
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port))
    }

    /// Returns the address of the admin CLI (`-T`).
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin_port))
    }

    /// Returns the path of the secret file (`-S`).
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// Returns the `-n` working directory.
    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("workdir")
    }

    /// Returns the temporary directory; files written here are readable by varnishd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the status and body of the first response on a new admin connection
    /// (107 and the challenge when varnishd is healthy).
    pub async fn admin_greeting(&self) -> anyhow::Result<(u16, String)> {
        read_admin_greeting(self.admin_addr()).await
    }

    /// Runs one admin command with the `varnishadm` tool and returns its output.
    ///
    /// Handy in tests to look at what the agent did (`vcl.list`, `backend.list`, `status`).
    pub async fn varnishadm(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = tokio::process::Command::new("varnishadm");
        command
            .arg("-T")
            .arg(self.admin_addr().to_string())
            .arg("-S")
            .arg(self.secret_file())
            .args(args);
        run_to_completion(command).await
    }

    /// Returns everything varnishd logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Spawns `varnishd -F -f ''` with its `-n` directory and secret in `dir`, its output appended
/// to `dir/varnishd.log`.
fn spawn(dir: &Path, http_port: u16, admin_port: u16) -> anyhow::Result<ManagedProcess> {
    let binary = std::env::var_os("VAAS_VARNISHD").unwrap_or_else(|| "varnishd".into());
    let mut command = Command::new(binary);
    command
        .arg("-F")
        .arg("-n")
        .arg(dir.join("workdir"))
        .args(["-a", &format!("127.0.0.1:{http_port}")])
        .args(["-T", &format!("127.0.0.1:{admin_port}")])
        .arg("-S")
        .arg(dir.join("secret"))
        .args(["-f", ""])
        .args(["-p", "vcl_cooldown=1"])
        .args(deploy_arguments())
        .current_dir(dir);
    ManagedProcess::spawn(
        format!("varnishd :{http_port}"),
        command,
        &dir.join("varnishd.log"),
        "TERM",
    )
}

/// Reads one CLI response: a 13-byte header `"%-3d %-8d\n"`, the body, one newline.
async fn read_admin_greeting(admin: SocketAddr) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(admin).await?;
    let mut header = [0_u8; 13];
    stream.read_exact(&mut header).await?;
    let header = std::str::from_utf8(&header)?;
    let mut fields = header.split_whitespace();
    let (Some(status), Some(length)) = (fields.next(), fields.next()) else {
        bail!("bad CLI header {header:?}");
    };
    let status: u16 = status.parse()?;
    let length: usize = length.parse()?;
    let mut body = vec![0_u8; length];
    stream.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Returns 32 random bytes as lower-case hex, from /dev/urandom.
fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0_u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::Varnishd;
    use crate::{HttpOrigin, http_get};

    #[tokio::test]
    async fn admin_port_sends_the_authentication_challenge() -> anyhow::Result<()> {
        let varnishd = Varnishd::start().await?;
        let (status, body) = varnishd.admin_greeting().await?;
        assert_eq!(status, 107, "{body}");
        assert!(body.contains("Authentication required"), "{body}");
        // The secret file works for an authenticated client.
        let state = varnishd.varnishadm(&["status"]).await?;
        assert!(state.contains("Child in state stopped"), "{state}");
        Ok(())
    }

    #[tokio::test]
    async fn a_restart_keeps_ports_and_secret_and_comes_back_empty() -> anyhow::Result<()> {
        let mut varnishd = Varnishd::start().await?;
        let (admin, http) = (varnishd.admin_addr(), varnishd.http_addr());
        let vcl = "\"vcl 4.1; backend none_here none;\"";
        varnishd.varnishadm(&["vcl.inline", "boot", vcl]).await?;
        varnishd.varnishadm(&["vcl.use", "boot"]).await?;
        varnishd.varnishadm(&["start"]).await?;

        varnishd.restart().await?;
        assert_eq!((varnishd.admin_addr(), varnishd.http_addr()), (admin, http));
        // The same secret file still opens the admin port; what was loaded is gone.
        let list = varnishd.varnishadm(&["vcl.list"]).await?;
        assert!(!list.contains("boot"), "{list}");
        let state = varnishd.varnishadm(&["status"]).await?;
        assert!(state.contains("Child in state stopped"), "{state}");
        Ok(())
    }

    #[tokio::test]
    async fn serves_an_origin_once_a_vcl_is_loaded_and_started() -> anyhow::Result<()> {
        let origin = HttpOrigin::start("a").await?;
        let varnishd = Varnishd::start().await?;
        // vcl.inline, not vcl.load of a file: the deploy's vcc_unsafe_path=off refuses VCL files
        // by absolute path, and the agent never loads files either.
        let vcl = format!(
            "vcl 4.1; backend origin {{ .host = \"127.0.0.1\"; .port = \"{}\"; }}",
            origin.addr().port()
        );
        // varnishadm joins its arguments with spaces: quote the VCL as one CLI word.
        let quoted = format!("\"{}\"", vcl.replace('"', "\\\""));
        varnishd
            .varnishadm(&["vcl.inline", "boot", &quoted])
            .await?;
        varnishd.varnishadm(&["vcl.use", "boot"]).await?;
        varnishd.varnishadm(&["start"]).await?;
        let response = http_get(varnishd.http_addr(), "/hello", "example.com").await?;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("x-origin"), Some("a"));
        assert_eq!(response.body, "origin a");
        Ok(())
    }
}
