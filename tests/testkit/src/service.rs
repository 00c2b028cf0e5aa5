//! Any other program a test starts (the VaaS binaries themselves), with the same care as the
//! daemons: own process group, log file, stop on drop, log printed on failure.

use std::path::Path;
use std::process::Command;

use anyhow::anyhow;

use crate::process::{ManagedProcess, StartFailure};

/// A running program started by a test.
#[derive(Debug)]
pub struct ServiceProcess {
    process: ManagedProcess,
}

impl ServiceProcess {
    /// Spawns `command` with its output in `log_path`; it is sent SIGTERM (then SIGKILL) on drop.
    pub fn spawn(name: &str, command: Command, log_path: &Path) -> anyhow::Result<ServiceProcess> {
        Ok(ServiceProcess {
            process: ManagedProcess::spawn(name, command, log_path, "TERM")?,
        })
    }

    /// Waits until the log contains `line` (for example "attached to scheduler"), the program
    /// exits, or [`crate::READY_TIMEOUT`] passes.
    pub async fn wait_for_log(&mut self, line: &str) -> anyhow::Result<()> {
        self.wait_for_log_count(line, 1).await
    }

    /// Waits until the log contains `line` at least `count` times, the program exits, or
    /// [`crate::READY_TIMEOUT`] passes.
    pub async fn wait_for_log_count(&mut self, line: &str, count: usize) -> anyhow::Result<()> {
        let log = self.process.log_path().to_owned();
        let wanted = line.to_owned();
        self.wait_until(line, || {
            let log = log.clone();
            let wanted = wanted.clone();
            async move {
                tokio::fs::read_to_string(&log)
                    .await
                    .is_ok_and(|text| text.matches(&wanted).count() >= count)
            }
        })
        .await
    }

    /// Waits until `probe` answers true (a gRPC health check, say), the program exits, or
    /// [`crate::READY_TIMEOUT`] passes; `what` names the condition in the error.
    pub async fn wait_until<F, Fut>(&mut self, what: &str, probe: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        match self.process.wait_ready(what, probe).await {
            Ok(()) => Ok(()),
            Err(StartFailure::PortTaken(error) | StartFailure::Fatal(error)) => Err(error),
        }
    }

    /// Returns how many times `line` occurs in the log so far.
    pub fn count_in_log(&self, line: &str) -> usize {
        self.process.log().matches(line).count()
    }

    /// Returns the process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Returns the resident memory of the process in KiB, read from `/proc`.
    pub fn resident_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Returns everything the program wrote so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Stops the program now (SIGTERM, grace period, SIGKILL).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Kills the program at once (SIGKILL to its process group), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes the program (SIGSTOP to its process group) until [`ServiceProcess::resume`].
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Lets a paused program run again (SIGCONT).
    pub fn resume(&self) {
        self.process.resume();
    }

    /// Fails unless the program is still running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.process.exit_status() {
            None => Ok(()),
            Some(status) => Err(anyhow!("exited with {status}; its log:\n{}", self.log())),
        }
    }
}
