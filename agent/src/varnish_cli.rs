//! A client of varnishd's admin CLI protocol (`-T host:port`, `-S secretfile`).
//!
//! Each response is a 13-byte header `"%-3d %-8d\n"` (status, body length), the body, and one
//! more `"\n"`. On connect, varnishd sends a 107 challenge that is answered with the SHA-256 of
//! `challenge "\n" secret challenge "\n"`. Multi-line arguments go in a heredoc.
//!
//! A command that times out leaves the connection in an unknown state (its answer may still come):
//! the client then refuses further commands with [`CliError::Broken`], and the caller reconnects.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Length of a response header: `"%-3d %-8d\n"`.
const HEADER_LENGTH: usize = 13;
/// Bodies longer than this are refused as a protocol error (varnishd's `cli_limit` is 48 KiB by
/// default and at most a few MiB).
const MAX_BODY_LENGTH: usize = 64 * 1024 * 1024;

/// The status of a CLI response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CliStatus {
    /// 100: syntax error in the command line.
    Syntax,
    /// 101: unknown command.
    Unknown,
    /// 102: command not implemented.
    Unimplemented,
    /// 104: too few parameters.
    TooFew,
    /// 105: too many parameters.
    TooMany,
    /// 106: bad parameter, including a VCL compile error (the body is the compiler's message).
    Param,
    /// 107: authentication required.
    Auth,
    /// 200: success.
    Ok,
    /// 201: success, the body was truncated at `cli_limit`.
    Truncated,
    /// 300: the command cannot be carried out (for example discarding the active VCL).
    Cant,
    /// 400: communication error.
    Comms,
    /// 500: the connection is closing.
    Close,
    /// Any other code.
    Other(u16),
}

impl CliStatus {
    /// Returns the status of a numeric code.
    pub fn from_code(code: u16) -> CliStatus {
        match code {
            100 => CliStatus::Syntax,
            101 => CliStatus::Unknown,
            102 => CliStatus::Unimplemented,
            104 => CliStatus::TooFew,
            105 => CliStatus::TooMany,
            106 => CliStatus::Param,
            107 => CliStatus::Auth,
            200 => CliStatus::Ok,
            201 => CliStatus::Truncated,
            300 => CliStatus::Cant,
            400 => CliStatus::Comms,
            500 => CliStatus::Close,
            other => CliStatus::Other(other),
        }
    }

    /// Returns the numeric code.
    pub fn code(self) -> u16 {
        match self {
            CliStatus::Syntax => 100,
            CliStatus::Unknown => 101,
            CliStatus::Unimplemented => 102,
            CliStatus::TooFew => 104,
            CliStatus::TooMany => 105,
            CliStatus::Param => 106,
            CliStatus::Auth => 107,
            CliStatus::Ok => 200,
            CliStatus::Truncated => 201,
            CliStatus::Cant => 300,
            CliStatus::Comms => 400,
            CliStatus::Close => 500,
            CliStatus::Other(code) => code,
        }
    }

    /// Tells whether the status means success (200, or 201 with a truncated body).
    pub fn is_success(self) -> bool {
        matches!(self, CliStatus::Ok | CliStatus::Truncated)
    }
}

impl fmt::Display for CliStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// One response of varnishd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliResponse {
    /// The status.
    pub status: CliStatus,
    /// The body, without the trailing newline of the frame.
    pub body: String,
}

/// Errors of the CLI client.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to varnishd at {addr}")]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("varnish cli i/o failed")]
    Io(#[from] std::io::Error),
    /// varnishd did not answer in time; the connection is no longer usable.
    #[error("varnish cli command {command} timed out after {after:?}")]
    Timeout {
        /// The command's first word (or "connect").
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// varnishd sent something that is not a CLI response.
    #[error("varnish cli protocol error: {0}")]
    Protocol(String),
    /// The secret was refused, or varnishd asked for an authentication that was not expected.
    #[error("varnish cli authentication failed with status {status}: {body}")]
    Auth {
        /// The status of the answer to `auth`.
        status: CliStatus,
        /// Its body.
        body: String,
    },
    /// A command was answered with an unsuccessful status.
    #[error("varnish cli command {command} failed with status {status}: {body}")]
    Command {
        /// The command's first word.
        command: String,
        /// The status.
        status: CliStatus,
        /// The body: for a VCL compile error (106), the compiler's message.
        body: String,
    },
    /// A VCL name does not start with a letter followed by letters, digits, `_` or `-`.
    #[error("invalid vcl name {0:?}")]
    InvalidVclName(String),
    /// An argument holds characters the protocol cannot carry (a NUL byte, or a newline outside
    /// the heredoc).
    #[error("invalid cli argument {0:?}")]
    InvalidArgument(String),
    /// An earlier failure left the connection unusable.
    #[error("varnish cli connection is broken by an earlier failure")]
    Broken,
    /// `vcl.list -j` did not parse.
    #[error("cannot parse vcl.list output")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// Returns the status when varnishd answered the command unsuccessfully.
    pub fn status(&self) -> Option<CliStatus> {
        match self {
            CliError::Command { status, .. } | CliError::Auth { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Timeouts of the CLI client.
#[derive(Debug, Clone, Copy)]
pub struct CliTimeouts {
    /// TCP connect plus authentication.
    pub connect: Duration,
    /// Short commands (`vcl.use`, `vcl.list`, `status` ...).
    pub command: Duration,
    /// `vcl.inline` (compiling a VCL can take minutes with thousands of backends).
    pub load: Duration,
}

impl Default for CliTimeouts {
    fn default() -> CliTimeouts {
        CliTimeouts {
            connect: Duration::from_secs(5),
            command: Duration::from_secs(10),
            load: Duration::from_secs(300),
        }
    }
}

/// One VCL as listed by `vcl.list -j`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VclInfo {
    /// "active", "available" or "discarded".
    pub status: String,
    /// "auto", "cold", "warm" or "label".
    pub state: String,
    /// "warm", "cold", "cooling" ...
    pub temperature: String,
    /// Requests using it (absent while the child is stopped).
    #[serde(default)]
    pub busy: Option<u64>,
    /// Its name.
    pub name: String,
    /// For a label: the VCL it points to and how many VCLs `return (vcl(...))` to it.
    #[serde(default)]
    pub label: Option<LabelTarget>,
    /// For a VCL: how many labels point to it.
    #[serde(default)]
    pub labels: u64,
}

/// Where a label points, as `vcl.list -j` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LabelTarget {
    /// The labelled VCL.
    pub name: String,
    /// How many VCLs name the label in `return (vcl(...))`.
    #[serde(default)]
    pub refs: u64,
}

impl VclInfo {
    /// Tells whether this VCL is the active one.
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }
}

/// State of varnishd's child process, from `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildState {
    /// Serving requests.
    Running,
    /// Not started, or stopped.
    Stopped,
    /// Any other state ("starting", "stopping", "died" ...), as reported.
    Other(String),
}

/// Temperature to set with `vcl.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VclState {
    /// Varnish decides (warm while used).
    Auto,
    /// Backends and probes released.
    Cold,
    /// Kept warm.
    Warm,
}

impl VclState {
    fn as_str(self) -> &'static str {
        match self {
            VclState::Auto => "auto",
            VclState::Cold => "cold",
            VclState::Warm => "warm",
        }
    }
}

/// An authenticated connection to varnishd's admin port.
pub struct VarnishCli {
    stream: BufReader<TcpStream>,
    banner: String,
    timeouts: CliTimeouts,
    broken: bool,
}

impl fmt::Debug for VarnishCli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VarnishCli")
            .field("peer", &self.stream.get_ref().peer_addr().ok())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl VarnishCli {
    /// Connects to `addr` and authenticates with `secret` (the secret file's bytes, unchanged).
    pub async fn connect(
        addr: SocketAddr,
        secret: &[u8],
        timeouts: CliTimeouts,
    ) -> Result<VarnishCli, CliError> {
        let timed_out = || CliError::Timeout {
            command: "connect".into(),
            after: timeouts.connect,
        };
        tokio::time::timeout(
            timeouts.connect,
            Self::connect_inner(addr, secret, timeouts),
        )
        .await
        .map_err(|_| timed_out())?
    }

    async fn connect_inner(
        addr: SocketAddr,
        secret: &[u8],
        timeouts: CliTimeouts,
    ) -> Result<VarnishCli, CliError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| CliError::Connect { addr, source })?;
        stream.set_nodelay(true)?;
        let mut cli = VarnishCli {
            stream: BufReader::new(stream),
            banner: String::new(),
            timeouts,
            broken: false,
        };
        let mut greeting = cli.read_response().await?;
        if greeting.status == CliStatus::Auth {
            let challenge = greeting
                .body
                .get(..32)
                .ok_or_else(|| CliError::Protocol("short authentication challenge".into()))?;
            let line = format!("auth {}\n", auth_response(challenge, secret));
            cli.stream.get_mut().write_all(line.as_bytes()).await?;
            greeting = cli.read_response().await?;
            if greeting.status != CliStatus::Ok {
                return Err(CliError::Auth {
                    status: greeting.status,
                    body: greeting.body,
                });
            }
        } else if greeting.status != CliStatus::Ok {
            return Err(CliError::Protocol(format!(
                "unexpected greeting status {}",
                greeting.status
            )));
        }
        cli.banner = greeting.body;
        Ok(cli)
    }

    /// Returns the banner received after authentication.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// Returns varnishd's version from the banner, for example "varnish-7.1.1".
    pub fn varnish_version(&self) -> Option<&str> {
        self.banner
            .split_whitespace()
            .find(|word| word.starts_with("varnish-"))
    }

    /// Sends a one-line command (arguments are quoted as needed) and returns varnishd's answer,
    /// whatever its status, within the short-command timeout.
    pub async fn raw(&mut self, args: &[&str]) -> Result<CliResponse, CliError> {
        let mut line = String::new();
        for (index, arg) in args.iter().enumerate() {
            if index > 0 {
                line.push(' ');
            }
            line.push_str(&quote(arg)?);
        }
        line.push('\n');
        let timeout = self.timeouts.command;
        self.exchange(args.first().copied().unwrap_or(""), &line, timeout)
            .await
    }

    /// Sends a command and fails unless it succeeds (200 or 201).
    pub async fn command(&mut self, args: &[&str]) -> Result<CliResponse, CliError> {
        let response = self.raw(args).await?;
        check(args.first().copied().unwrap_or(""), response)
    }

    /// Sends `ping`.
    pub async fn ping(&mut self) -> Result<(), CliError> {
        self.command(&["ping"]).await.map(drop)
    }

    /// Compiles and loads `text` as VCL `name` (`vcl.inline` with a heredoc), within the load
    /// timeout. A compile error is [`CliError::Command`] with status 106 and the compiler's
    /// message.
    pub async fn vcl_inline(&mut self, name: &str, text: &str) -> Result<(), CliError> {
        check_vcl_name(name)?;
        if text.contains('\0') {
            return Err(CliError::InvalidArgument("vcl text with a nul byte".into()));
        }
        let token = heredoc_token(text);
        let mut body = String::with_capacity(text.len() + 64);
        body.push_str("vcl.inline ");
        body.push_str(name);
        body.push_str(" << ");
        body.push_str(&token);
        body.push('\n');
        body.push_str(text);
        if !text.ends_with('\n') {
            body.push('\n');
        }
        body.push_str(&token);
        body.push('\n');
        let timeout = self.timeouts.load;
        let response = self.exchange("vcl.inline", &body, timeout).await?;
        check("vcl.inline", response).map(drop)
    }

    /// Makes VCL `name` the active one.
    pub async fn vcl_use(&mut self, name: &str) -> Result<(), CliError> {
        check_vcl_name(name)?;
        self.command(&["vcl.use", name]).await.map(drop)
    }

    /// Discards VCL `name`.
    pub async fn vcl_discard(&mut self, name: &str) -> Result<(), CliError> {
        check_vcl_name(name)?;
        self.command(&["vcl.discard", name]).await.map(drop)
    }

    /// Points label `label` at VCL `vcl` (creating the label, or moving it at once).
    pub async fn vcl_label(&mut self, label: &str, vcl: &str) -> Result<(), CliError> {
        check_vcl_name(label)?;
        check_vcl_name(vcl)?;
        self.command(&["vcl.label", label, vcl]).await.map(drop)
    }

    /// Sets the temperature of VCL `name`.
    pub async fn vcl_state(&mut self, name: &str, state: VclState) -> Result<(), CliError> {
        check_vcl_name(name)?;
        self.command(&["vcl.state", name, state.as_str()])
            .await
            .map(drop)
    }

    /// Lists the loaded VCLs (`vcl.list -j`).
    pub async fn vcl_list(&mut self) -> Result<Vec<VclInfo>, CliError> {
        let response = self.command(&["vcl.list", "-j"]).await?;
        parse_vcl_list(&response.body)
    }

    /// Returns a parameter's value and whether it is protected (read-only, from `-r` at start).
    pub async fn param(&mut self, name: &str) -> Result<ParamInfo, CliError> {
        let response = self.command(&["param.show", "-j", name]).await?;
        parse_param(&response.body)
    }

    /// Returns the state of the child process.
    pub async fn status(&mut self) -> Result<ChildState, CliError> {
        let response = self.command(&["status"]).await?;
        let state = response
            .body
            .trim()
            .strip_prefix("Child in state ")
            .unwrap_or(response.body.trim());
        Ok(match state {
            "running" => ChildState::Running,
            "stopped" => ChildState::Stopped,
            other => ChildState::Other(other.to_owned()),
        })
    }

    /// Starts the child process.
    pub async fn start(&mut self) -> Result<(), CliError> {
        self.command(&["start"]).await.map(drop)
    }

    /// Writes `request` and reads one response within `timeout`; marks the connection broken on
    /// any transport failure.
    async fn exchange(
        &mut self,
        command: &str,
        request: &str,
        timeout: Duration,
    ) -> Result<CliResponse, CliError> {
        if self.broken {
            return Err(CliError::Broken);
        }
        self.broken = true;
        let result = tokio::time::timeout(timeout, async {
            self.stream.get_mut().write_all(request.as_bytes()).await?;
            self.read_response().await
        })
        .await;
        let response = match result {
            Ok(response) => response?,
            Err(_) => {
                return Err(CliError::Timeout {
                    command: command.to_owned(),
                    after: timeout,
                });
            }
        };
        if response.status != CliStatus::Close {
            self.broken = false;
        }
        Ok(response)
    }

    async fn read_response(&mut self) -> Result<CliResponse, CliError> {
        let mut header = [0u8; HEADER_LENGTH];
        self.stream.read_exact(&mut header).await?;
        let (status, length) = parse_header(&header)?;
        let mut body = vec![0u8; length + 1];
        self.stream.read_exact(&mut body).await?;
        if body.pop() != Some(b'\n') {
            return Err(CliError::Protocol(
                "response body not followed by a newline".into(),
            ));
        }
        Ok(CliResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Computes the answer to an authentication challenge.
pub fn auth_response(challenge: &str, secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(challenge.as_bytes());
    hasher.update(b"\n");
    hasher.update(secret);
    hasher.update(challenge.as_bytes());
    hasher.update(b"\n");
    hex::encode(hasher.finalize())
}

/// Checks a VCL name: a letter first, then letters, digits, `_` or `-`.
pub fn check_vcl_name(name: &str) -> Result<(), CliError> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(CliError::InvalidVclName(name.to_owned()))
    }
}

fn check(command: &str, response: CliResponse) -> Result<CliResponse, CliError> {
    if response.status.is_success() {
        return Ok(response);
    }
    Err(CliError::Command {
        command: command.to_owned(),
        status: response.status,
        body: response.body,
    })
}

fn parse_header(header: &[u8; HEADER_LENGTH]) -> Result<(CliStatus, usize), CliError> {
    let malformed = || CliError::Protocol(format!("malformed header {:?}", header));
    let text = std::str::from_utf8(header).map_err(|_| malformed())?;
    if !text.ends_with('\n') {
        return Err(malformed());
    }
    let status: u16 = text[..3].trim().parse().map_err(|_| malformed())?;
    let length: usize = text[4..12].trim().parse().map_err(|_| malformed())?;
    if length > MAX_BODY_LENGTH {
        return Err(malformed());
    }
    Ok((CliStatus::from_code(status), length))
}

/// Quotes an argument when it holds spaces, quotes or backslashes.
fn quote(arg: &str) -> Result<String, CliError> {
    if arg.contains(['\0', '\n', '\r']) {
        return Err(CliError::InvalidArgument(arg.to_owned()));
    }
    if !arg.is_empty() && !arg.contains([' ', '\t', '"', '\\']) {
        return Ok(arg.to_owned());
    }
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('"');
    for c in arg.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\t' => quoted.push_str("\\t"),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Ok(quoted)
}

/// Returns a heredoc token that does not occur anywhere in `text`.
fn heredoc_token(text: &str) -> String {
    let mut token = String::from("VAAS_EOF");
    let mut counter = 0u64;
    while text.contains(&token) {
        counter += 1;
        token = format!("VAAS_EOF_{counter}");
    }
    token
}

/// Parses `vcl.list -j`: `[version, [command...], timestamp, {vcl}...]`.
/// One varnishd parameter as `param.show -j` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// The value (a bool, a number or a string, as varnishd types it).
    pub value: serde_json::Value,
    /// Whether it is protected: started with `-r`, it cannot be changed over the CLI.
    pub protected: bool,
}

/// Parses `param.show -j NAME`: `[version, [command…], time, {"value": …, "flags": […]}]`.
fn parse_param(body: &str) -> Result<ParamInfo, CliError> {
    let items: Vec<serde_json::Value> = serde_json::from_str(body)?;
    let param = items
        .iter()
        .find(|item| item.get("value").is_some())
        .ok_or_else(|| CliError::InvalidArgument("param.show -j gave no parameter".into()))?;
    let protected = param
        .get("flags")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|flags| flags.iter().any(|flag| flag == "protected"));
    Ok(ParamInfo {
        value: param["value"].clone(),
        protected,
    })
}

fn parse_vcl_list(body: &str) -> Result<Vec<VclInfo>, CliError> {
    let items: Vec<serde_json::Value> = serde_json::from_str(body)?;
    items
        .into_iter()
        .skip(3)
        .map(|item| serde_json::from_value(item).map_err(CliError::from))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn param_show_json_gives_the_value_and_whether_it_is_protected() {
        let body = r#"[ 2, ["param.show", "-j", "vcc_allow_inline_c"], 1795327956.270,
  {"name": "vcc_allow_inline_c", "implemented": true, "value": false, "units": "bool",
   "default": "off", "description": "Allow inline C code in VCL.", "flags": ["protected"]}
]"#;
        let param = parse_param(body).unwrap();
        assert_eq!(param.value, serde_json::Value::Bool(false));
        assert!(param.protected);
        let writable = body.replace(r#"["protected"]"#, "[]");
        assert!(!parse_param(&writable).unwrap().protected);
    }

    use super::*;

    #[test]
    fn auth_response_matches_the_documented_formula() {
        // sha256("abc\nsecret\nabc\n")
        let expected = hex::encode(Sha256::digest(b"abc\nsecret\nabc\n"));
        assert_eq!(auth_response("abc", b"secret\n"), expected);
    }

    #[test]
    fn headers_are_parsed() {
        assert_eq!(
            parse_header(b"200 12      \n").ok(),
            Some((CliStatus::Ok, 12))
        );
        assert_eq!(
            parse_header(b"106 0       \n").ok(),
            Some((CliStatus::Param, 0))
        );
        assert!(parse_header(b"20x 12      \n").is_err());
        assert!(parse_header(b"200 12       ").is_err());
    }

    #[test]
    fn statuses_round_trip() {
        for code in [
            100, 101, 102, 104, 105, 106, 107, 200, 201, 300, 400, 500, 999,
        ] {
            assert_eq!(CliStatus::from_code(code).code(), code);
        }
        assert!(CliStatus::Truncated.is_success());
        assert!(!CliStatus::Param.is_success());
    }

    #[test]
    fn vcl_names_are_checked() {
        assert!(check_vcl_name("vaas-0123456789abcdef-1_a").is_ok());
        for bad in ["", "1a", "-a", "a b", "a.b", "a\n", "a\"", "é"] {
            assert!(check_vcl_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arguments_are_quoted() {
        assert_eq!(quote("vcl.use").ok().as_deref(), Some("vcl.use"));
        assert_eq!(quote("a b").ok().as_deref(), Some("\"a b\""));
        assert_eq!(quote("a\"\\").ok().as_deref(), Some("\"a\\\"\\\\\""));
        assert_eq!(quote("").ok().as_deref(), Some("\"\""));
        assert!(quote("a\nb").is_err());
    }

    #[test]
    fn heredoc_token_avoids_the_text() {
        assert_eq!(heredoc_token("vcl 4.1;"), "VAAS_EOF");
        assert_eq!(heredoc_token("VAAS_EOF"), "VAAS_EOF_1");
        assert_eq!(heredoc_token("VAAS_EOF VAAS_EOF_1"), "VAAS_EOF_2");
    }

    #[test]
    fn labels_and_their_references_are_parsed_from_vcl_list() {
        let body = r#"[ 2, ["vcl.list", "-j"], 1796279161.489,
  {"status": "available", "state": "label", "temperature": "warm", "busy": 0,
   "name": "vaas_l_1", "label": {"name": "vaasd-1", "refs": 2}},
  {"status": "available", "state": "auto", "temperature": "warm", "busy": 0,
   "name": "vaasd-1", "labels": 1}
]"#;
        let list = parse_vcl_list(body).expect("parses");
        let target = list[0].label.as_ref().expect("a label");
        assert_eq!((target.name.as_str(), target.refs), ("vaasd-1", 2));
        assert_eq!((list[0].labels, list[1].labels), (0, 1));
        assert_eq!(list[1].label, None);
    }

    #[test]
    fn vcl_list_is_parsed() {
        let body = r#"[ 2, ["vcl.list", "-j"], 1795302102.514,
  {
    "status": "active",
    "state": "auto",
    "temperature": "warm",
    "busy": 0,
    "name": "a1"
},
  {
    "status": "available",
    "state": "cold",
    "temperature": "cold",
    "name": "a2"
}
]"#;
        let list = parse_vcl_list(body).expect("parses");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].label, None);
        assert!(list[0].is_active());
        assert_eq!(list[0].busy, Some(0));
        assert_eq!(list[1].name, "a2");
        assert_eq!(list[1].busy, None);
        assert!(
            parse_vcl_list("[ 2, [\"vcl.list\", \"-j\"], 1.0\n]")
                .expect("empty")
                .is_empty()
        );
    }
}
