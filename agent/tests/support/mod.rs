//! Test support: a real varnishd on free ports, a tiny HTTP origin and a raw HTTP client.
//!
//! Deliberately small and self-contained: the system-wide harness lives in `tests/`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli};

/// How long varnishd may take to answer its first CLI connection.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// A varnishd started with `-F -f ''` (manager only: no VCL, child stopped), killed on drop.
/// When the test panics, its stderr is printed.
pub struct Varnishd {
    child: Child,
    /// The admin (CLI) address.
    pub admin: SocketAddr,
    /// The HTTP address.
    pub http: SocketAddr,
    /// The secret file's content.
    pub secret: Vec<u8>,
    /// The secret file.
    pub secret_file: PathBuf,
    log_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Varnishd {
    /// Starts varnishd and waits until its CLI answers.
    pub async fn start() -> Varnishd {
        let dir = tempfile::tempdir().expect("tempdir");
        // As root, varnishd drops to the users varnish/vcache: they must reach the work dir and
        // read the secret.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let secret_file = dir.path().join("secret");
        let secret = format!("test-secret-{}\n", std::process::id()).into_bytes();
        std::fs::write(&secret_file, &secret).expect("write secret");
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644))
            .expect("chmod secret");
        let admin = free_port();
        let http = free_port();
        let log_file = dir.path().join("varnishd.log");
        let child = spawn(dir.path(), admin, http, &secret_file, &log_file);
        let mut varnishd = Varnishd {
            child,
            admin,
            http,
            secret,
            secret_file,
            log_file,
            _dir: dir,
        };
        varnishd.wait_ready().await;
        varnishd
    }

    /// Stops varnishd and starts it again as a restart would: same ports, `-n` directory and
    /// secret, and no VCL (`-f ''`), with the child stopped. Returns once its CLI answers.
    pub async fn restart(&mut self) {
        self.stop();
        self.child = spawn(
            self._dir.path(),
            self.admin,
            self.http,
            &self.secret_file,
            &self.log_file,
        );
        self.wait_ready().await;
    }

    /// Stops varnishd: SIGTERM lets the manager stop its child; SIGKILL if it does not exit soon.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("varnishd exited with {status}:\n{}", self.logs());
            }
            match VarnishCli::connect(self.admin, &self.secret, timeouts()).await {
                Ok(_) => return,
                Err(error) if Instant::now() > deadline => {
                    panic!("varnishd not ready: {error}\n{}", self.logs())
                }
                // The manager is still starting: retry at once (bounded by the deadline).
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Opens an authenticated CLI connection.
    pub async fn cli(&self) -> VarnishCli {
        match VarnishCli::connect(self.admin, &self.secret, timeouts()).await {
            Ok(cli) => cli,
            Err(error) => panic!("cli connect: {error}\n{}", self.logs()),
        }
    }

    /// Returns what varnishd wrote on stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for Varnishd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- varnishd output ----\n{}", self.logs());
        }
        self.stop();
    }
}

/// Spawns `varnishd -F -f ''` with its `-n` directory in `dir`, its output appended to
/// `log_file`.
fn spawn(
    dir: &Path,
    admin: SocketAddr,
    http: SocketAddr,
    secret_file: &Path,
    log_file: &Path,
) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log_file)
        .expect("log file");
    Command::new(varnishd_path())
        .arg("-F")
        .arg("-n")
        .arg(dir.join("n"))
        .arg("-a")
        .arg(http.to_string())
        .arg("-T")
        .arg(admin.to_string())
        .arg("-S")
        .arg(secret_file)
        .args(["-f", "", "-s", "malloc,16m"])
        .args(["-p", "vcl_cooldown=1", "-p", "thread_pool_min=5"])
        .args(["-p", "thread_pool_max=50", "-p", "thread_pools=1"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn varnishd")
}

/// CLI timeouts for tests.
pub fn timeouts() -> CliTimeouts {
    CliTimeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_secs(10),
        load: Duration::from_secs(120),
    }
}

fn varnishd_path() -> PathBuf {
    std::env::var_os("VARNISHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/varnishd"))
}

/// Returns a free port on 127.0.0.1.
pub fn free_port() -> SocketAddr {
    let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: BTreeMap<String, String>,
    /// Body.
    pub body: String,
}

impl HttpResponse {
    /// Returns the VaaS version header.
    pub fn vcl_version(&self) -> Option<&str> {
        self.headers.get("x-vaas-vcl-version").map(String::as_str)
    }
}

/// Sends `GET path` with `Host: host` and `Connection: close`, and reads the whole response.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to varnish");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read response");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Starts an origin on `ip:0` that answers every request with 200 and `body`; returns its
/// address, or `None` when `ip` cannot be bound (no IPv6 on this machine).
pub async fn start_origin(ip: IpAddr, body: &'static str) -> Option<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.ok()?;
    let addr = listener.local_addr().ok()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\
                     X-Origin: test\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Some(addr)
}
