//! A child process in its own process group, with its output in a log file, stopped on drop.

use std::fs::File;
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use tracing::{debug, warn};

use crate::READY_TIMEOUT;

/// How many times a start function tries new ports before giving up.
pub(crate) const PORT_ATTEMPTS: u32 = 5;

/// How long one readiness probe may take before it counts as "not ready yet".
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// How long a process gets to exit after its stop signal before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why a process could not be started.
#[derive(Debug)]
pub(crate) enum StartFailure {
    /// The process died because one of its ports was taken: try again with new ports.
    PortTaken(anyhow::Error),
    /// Anything else: give up.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for StartFailure {
    fn from(error: anyhow::Error) -> Self {
        StartFailure::Fatal(error)
    }
}

impl From<std::io::Error> for StartFailure {
    fn from(error: std::io::Error) -> Self {
        StartFailure::Fatal(error.into())
    }
}

/// Runs `attempt` until it succeeds, fails for another reason than a taken port, or has been
/// tried [`PORT_ATTEMPTS`] times.
pub(crate) async fn retry_on_port_clash<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StartFailure>>,
{
    let mut number = 1;
    loop {
        match attempt().await {
            Ok(started) => return Ok(started),
            Err(StartFailure::PortTaken(error)) if number < PORT_ATTEMPTS => {
                warn!(what, attempt = number, %error, "port taken, retrying with new ports");
                number += 1;
            }
            Err(StartFailure::PortTaken(error) | StartFailure::Fatal(error)) => {
                return Err(error.context(format!("cannot start {what}")));
            }
        }
    }
}

/// A running child process, leader of its own process group, writing to a log file.
///
/// Dropping it sends `stop_signal` to the whole group, waits up to [`STOP_GRACE`], then kills
/// the group; and prints the log.
#[derive(Debug)]
pub(crate) struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
    stop_signal: &'static str,
    stopped: bool,
}

impl ManagedProcess {
    /// Spawns `command` in a new process group with stdout and stderr appended to `log_path`.
    ///
    /// `stop_signal` is a signal name for `kill` (`TERM`, `INT`, …).
    pub(crate) fn spawn(
        name: impl Into<String>,
        mut command: Command,
        log_path: &Path,
        stop_signal: &'static str,
    ) -> anyhow::Result<Self> {
        let name = name.into();
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("cannot open log file {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        debug!(name, ?command, "spawning");
        let child = command.spawn().with_context(|| {
            format!("cannot spawn {name} ({command:?}); is it installed? (deploy/install.sh)")
        })?;
        Ok(ManagedProcess {
            name,
            child,
            log_path: log_path.to_owned(),
            stop_signal,
            stopped: false,
        })
    }

    /// Returns everything the process wrote to stdout and stderr so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|error| {
            format!("<cannot read log {}: {error}>", self.log_path.display())
        })
    }

    /// Returns the path of the log file.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Returns the process id (also the process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the exit status if the process has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Polls `probe` until it returns true, the process exits, or [`READY_TIMEOUT`] passes.
    ///
    /// An exit whose log says a port was taken is a [`StartFailure::PortTaken`].
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        mut probe: F,
    ) -> Result<(), StartFailure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(self.exited_early(status));
            }
            if tokio::time::timeout(PROBE_TIMEOUT, probe()).await == Ok(true) {
                // The probe may have reached another process on a raced port: make sure ours
                // is still the one running.
                if let Some(status) = self.exit_status() {
                    return Err(self.exited_early(status));
                }
                debug!(name = self.name, pid = self.pid(), what, "ready");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Fatal(anyhow!(
                    "{} was not ready ({what}) within {READY_TIMEOUT:?}; its log:\n{}",
                    self.name,
                    self.log()
                )));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn exited_early(&self, status: ExitStatus) -> StartFailure {
        let log = self.log();
        let error = anyhow!(
            "{} exited with {status} before it was ready; its log:\n{log}",
            self.name
        );
        if port_taken(&log) {
            StartFailure::PortTaken(error)
        } else {
            StartFailure::Fatal(error)
        }
    }

    /// Stops the process group: the stop signal, a grace period, then SIGKILL.
    pub(crate) fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pid = self.pid();
        if self.exit_status().is_none() {
            signal_group(pid, self.stop_signal);
            // A paused (SIGSTOP) group acts on the stop signal only once it runs again.
            signal_group(pid, "CONT");
            let deadline = Instant::now() + STOP_GRACE;
            while self.exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exit_status().is_none() {
                warn!(name = self.name, pid, "did not stop in time, killing");
            }
        }
        // Also reaps helpers left in the group (varnishd's child, postgres' workers).
        signal_group(pid, "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process group at once (SIGKILL, no grace period), as a crash would, and reaps it.
    pub(crate) fn kill(&mut self) {
        self.stopped = true;
        signal_group(self.pid(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the whole process group (SIGSTOP), as a hung machine or a long pause would;
    /// [`ManagedProcess::resume`] lets it go on.
    pub(crate) fn pause(&self) {
        signal_group(self.pid(), "STOP");
    }

    /// Lets a paused process group run again (SIGCONT).
    pub(crate) fn resume(&self) {
        signal_group(self.pid(), "CONT");
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
        let quiet = std::env::var_os("VAAS_TESTKIT_QUIET").is_some_and(|value| value != "0");
        if std::thread::panicking() || !quiet {
            eprintln!(
                "----- log of {} ({}) -----\n{}\n----- end of log of {} -----",
                self.name,
                self.log_path.display(),
                self.log().trim_end(),
                self.name
            );
        }
    }
}

/// Tells whether a log says the process could not listen because the address was taken.
fn port_taken(log: &str) -> bool {
    let log = log.to_lowercase();
    log.contains("already in use") || log.contains("could not be listened on")
}

/// Sends `signal` to every process of the group `pgid` (errors ignored: the group may be gone).
fn signal_group(pgid: u32, signal: &str) {
    // The shell's builtin `kill` needs no extra package and no unsafe code. Dash's builtin does
    // not take `--`; a negative pid right after the signal means the process group.
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -{signal} -{pgid} 2>/dev/null")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs a short command to completion and fails with its output unless it succeeds.
pub(crate) async fn run_to_completion(
    mut command: tokio::process::Command,
) -> anyhow::Result<String> {
    let description = format!("{:?}", command.as_std());
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {description}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(anyhow!(
            "{description} failed with {}:\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::{PORT_ATTEMPTS, StartFailure, port_taken, retry_on_port_clash};

    #[tokio::test]
    async fn retries_only_when_a_port_was_taken() -> anyhow::Result<()> {
        let mut attempts = 0;
        let started = retry_on_port_clash("test", || {
            attempts += 1;
            let outcome = if attempts < 3 {
                Err(StartFailure::PortTaken(anyhow!("address already in use")))
            } else {
                Ok(attempts)
            };
            async move { outcome }
        })
        .await?;
        assert_eq!(started, 3);

        let mut fatal_attempts = 0;
        let failed = retry_on_port_clash("test", || {
            fatal_attempts += 1;
            async { Err::<(), _>(StartFailure::Fatal(anyhow!("bad flag"))) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(fatal_attempts, 1);

        let mut clash_attempts = 0;
        let gave_up = retry_on_port_clash("test", || {
            clash_attempts += 1;
            async { Err::<(), _>(StartFailure::PortTaken(anyhow!("address already in use"))) }
        })
        .await;
        assert!(gave_up.is_err());
        assert_eq!(clash_attempts, PORT_ATTEMPTS);
        Ok(())
    }

    #[test]
    fn recognises_taken_ports_in_logs_of_each_server() {
        assert!(port_taken(
            r#"[FTL] Error listening on port: 127.0.0.1:4222, "listen tcp 127.0.0.1:4222: bind: address already in use""#
        ));
        assert!(port_taken(
            "Error: Could not get socket 127.0.0.1:6081: Address already in use"
        ));
        assert!(port_taken(
            "Error: -T 127.0.0.1:6082 could not be listened on."
        ));
        assert!(port_taken(
            r#"LOG:  could not bind IPv4 address "127.0.0.1": Address already in use"#
        ));
        assert!(!port_taken("FATAL:  data directory has wrong ownership"));
    }
}
