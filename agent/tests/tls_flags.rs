//! The vaas-agent binary refuses, at start and with exit code 64, a scheduler URL whose scheme
//! does not match its TLS flags: `https://` is never downgraded to plaintext, and TLS flags are
//! never silently ignored for an `http://` URL.

use std::process::{Command, Output};

/// Runs the agent binary with `flags` (and a readable secret file and token file), without the
/// caller's environment so that no `VAAS_*` variable takes part.
fn run_agent(flags: &[&str]) -> anyhow::Result<Output> {
    let secret = tempfile::NamedTempFile::new()?;
    let output = Command::new(env!("CARGO_BIN_EXE_vaas-agent"))
        .env_clear()
        .arg("--varnish-secret-file")
        .arg(secret.path())
        .arg("--token-file")
        .arg(secret.path())
        .args(flags)
        .output()?;
    Ok(output)
}

#[test]
fn an_https_scheduler_url_without_tls_ca_exits_with_64_naming_the_flag() -> anyhow::Result<()> {
    let output = run_agent(&["--scheduler-url", "https://127.0.0.1:1"])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.starts_with("vaas-agent: --scheduler-url: https:// needs --tls-ca"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    Ok(())
}

#[test]
fn an_unreadable_tls_ca_exits_with_64_naming_the_flag_and_the_path() -> anyhow::Result<()> {
    let output = run_agent(&[
        "--scheduler-url",
        "https://127.0.0.1:1",
        "--tls-ca",
        "/nonexistent/ca.pem",
    ])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.starts_with("vaas-agent: cannot read --tls-ca /nonexistent/ca.pem: "),
        "{stderr}"
    );
    Ok(())
}
