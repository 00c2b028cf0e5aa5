//! vaas-agent runs beside one varnishd: it keeps a gRPC stream open to vaas-scheduler, renders
//! its server's VCL from the snapshots the scheduler sends, and loads, activates or discards VCLs
//! through varnishd's admin CLI.
//!
//! The agent has no listener of its own: [`run`] dials the scheduler's `AgentService.Attach`,
//! says hello (its server's identity and what varnishd runs), then executes commands one at a
//! time until the stream ends, and reconnects with a capped exponential backoff. Between
//! commands it checks that varnishd still runs what the scheduler was told: a varnishd that
//! restarted empty gets the last good VCL back at once, and the agent attaches again so that the
//! scheduler, told what runs, brings it up to date. It does not decide anything about reloads:
//! the scheduler does. [`varnish_cli`] is a standalone client of the Varnish admin protocol.

mod executor;
pub mod varnish_cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;
use tracing::{info, instrument, warn};
use vaas_proto::v1::agent_service_client::AgentServiceClient;
use vaas_proto::v1::{AgentHello, AttachRequest, attach_request, attach_response};

pub use executor::{KEPT_INACTIVE_VCLS, VCL_NAME_PREFIX, version_from_vcl_name};

use executor::Executor;
use varnish_cli::CliError;

/// The version of this agent.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How many results may wait to be sent to the scheduler (one command runs at a time, so one
/// would do; a few absorb a slow stream).
const OUTBOUND_CAPACITY: usize = 8;
/// The longest delay before trying the next replica after one that stands by.
const STANDBY_RETRY: Duration = Duration::from_millis(500);
/// First reconnect delay.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// Configuration of the agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// URL of vaas-scheduler's gRPC endpoint, for example `http://127.0.0.1:50052`; several
    /// replicas as a comma-separated list, tried in turn until the leader accepts the agent.
    pub scheduler_url: String,
    /// varnishd's admin (CLI) address, its `-T` argument.
    pub varnish_admin: SocketAddr,
    /// varnishd's secret file, its `-S` argument; read at every CLI connection.
    pub varnish_secret_file: PathBuf,
    /// The server's address as registered in VaaS (VarnishServer.address).
    pub server_address: String,
    /// The server's admin port as registered in VaaS (VarnishServer.admin_port).
    pub server_admin_port: u16,
    /// Host name reported to the scheduler, for people.
    pub hostname: String,
    /// Timeout of short CLI commands (`vcl.use`, `vcl.list`, `status` ...).
    pub cli_timeout: Duration,
    /// Timeout of `vcl.inline` (compiling a large VCL takes minutes).
    pub load_timeout: Duration,
    /// Timeout of TCP connects, to the scheduler and to varnishd (plus CLI authentication).
    pub connect_timeout: Duration,
    /// Timeout of opening the Attach stream, and the HTTP/2 keep-alive timeout that detects a
    /// scheduler gone silent.
    pub rpc_timeout: Duration,
    /// Longest delay between two reconnection attempts.
    pub max_backoff: Duration,
    /// How often varnishd's health is checked while the agent is attached and idle (it is also
    /// checked at once after a CLI failure); while varnishd cannot be reached, checks come
    /// sooner (from 200 ms, doubling) up to this interval.
    pub health_interval: Duration,
    /// Where the last VCL that was committed is kept, so that an empty varnishd (restarted
    /// with `-f ''`) gets it back even while no scheduler is reachable; `None` keeps nothing.
    pub state_dir: Option<PathBuf>,
    /// TLS for `https://` scheduler URLs: the CA to trust and, for mutual TLS, the agent's
    /// certificate; `None` allows only `http://` URLs.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// File holding this server's agent token (created with TokenService.CreateToken, role
    /// agent), read at every connection so that a rotated token needs no restart; `None` attaches
    /// without one, which only a scheduler without authentication accepts.
    pub token_file: Option<PathBuf>,
    /// How a large server's VCL is split into a top VCL and shard VCLs, so that a change to one
    /// director's backends recompiles only its shard ([`vaas_vcl::render_split`]); `None`
    /// always loads one VCL.
    pub vcl_split: Option<vaas_vcl::SplitOptions>,
}

impl Config {
    /// Returns a configuration with default timeouts; the server's identity defaults to the
    /// admin address.
    pub fn new(
        scheduler_url: impl Into<String>,
        varnish_admin: SocketAddr,
        varnish_secret_file: impl Into<PathBuf>,
    ) -> Config {
        Config {
            scheduler_url: scheduler_url.into(),
            varnish_admin,
            varnish_secret_file: varnish_secret_file.into(),
            server_address: varnish_admin.ip().to_string(),
            server_admin_port: varnish_admin.port(),
            hostname: String::new(),
            cli_timeout: Duration::from_secs(10),
            load_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(20),
            max_backoff: Duration::from_secs(10),
            health_interval: Duration::from_secs(2),
            state_dir: None,
            tls: None,
            token_file: None,
            vcl_split: Some(vaas_vcl::SplitOptions::default()),
        }
    }
}

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A scheduler URL is not a valid URI, or does not match the TLS configuration (`https://`
    /// without it, `http://` with it).
    #[error("unusable scheduler url")]
    SchedulerUrl(#[source] vaas_runtime::tls::TlsError),
    /// The scheduler URL list is empty.
    #[error("no scheduler url given")]
    NoSchedulerUrl,
    /// The scheduler could not be reached.
    #[error("cannot connect to the scheduler")]
    Connect(#[source] tonic::transport::Error),
    /// The scheduler refused or ended the stream with an error.
    #[error("attach stream failed")]
    Rpc(#[from] tonic::Status),
    /// Opening the Attach stream took longer than `rpc_timeout`.
    #[error("attach timed out after {0:?}")]
    AttachTimeout(Duration),
    /// The secret file could not be read.
    #[error("cannot read varnish secret file {path}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file could not be read, or holds no usable token.
    #[error("cannot use the token file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A varnishd CLI operation failed.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// A commit names a split top VCL whose prepare this agent does not remember (it restarted
    /// in between): without it the labels cannot be moved, so the reload must prepare again.
    #[error("split vcl {0} was not prepared by this agent: prepare it again")]
    SplitNotPrepared(String),
}

/// Runs the agent until `shutdown` is cancelled. Returns an error only for a configuration that
/// can never work (an invalid scheduler URL); every other failure is logged and retried.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let endpoints = endpoints(&config)?;
    let mut executor = Executor::new(config.clone());
    let mut backoff = INITIAL_BACKOFF;
    let mut replica = 0;
    loop {
        let (url, endpoint) = &endpoints[replica % endpoints.len()];
        let attached = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            outcome = session(&config, url, endpoint, &mut executor, &shutdown) => outcome,
        };
        match attached {
            Ok(Attached::ShutDown) => return Ok(()),
            // At once and to the same replica: the scheduler must hear what varnishd runs now.
            Ok(Attached::Repaired) => {
                backoff = INITIAL_BACKOFF;
                continue;
            }
            Ok(Attached::Ended) => {
                info!("scheduler closed the attach stream");
                backoff = INITIAL_BACKOFF;
            }
            Err(SessionError { attached, error }) => {
                if attached {
                    backoff = INITIAL_BACKOFF;
                }
                // A replica standing by: the leader is elsewhere or about to be elected, so the
                // next replica is tried soon (a new leader must not wait for a long backoff).
                if matches!(&error, Error::Rpc(status) if status.code() == tonic::Code::Unavailable)
                {
                    backoff = backoff.min(STANDBY_RETRY);
                }
                warn!(error = %chain(&error), retry_in_ms = backoff.as_millis() as u64, "agent session failed");
            }
        }
        // Rotating through the replicas finds the leader; the others refuse the stream.
        replica += 1;
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// Splits `scheduler_url` into one endpoint per replica.
pub fn endpoints(config: &Config) -> Result<Vec<(String, Endpoint)>, Error> {
    let urls: Vec<&str> = config
        .scheduler_url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(Error::NoSchedulerUrl);
    }
    urls.into_iter()
        .map(|url| {
            let endpoint = vaas_runtime::tls::client_endpoint(url, config.tls.as_ref())
                .map_err(Error::SchedulerUrl)?;
            let endpoint = endpoint
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(config.rpc_timeout / 2)
                .keep_alive_timeout(config.rpc_timeout)
                .keep_alive_while_idle(true);
            Ok((url.to_owned(), endpoint))
        })
        .collect()
}

/// How a session ended without error.
enum Attached {
    /// The shutdown token was cancelled.
    ShutDown,
    /// The scheduler ended the stream.
    Ended,
    /// The agent ended the stream after it found varnishd not running what the scheduler was
    /// told (and repaired what it could), to say hello again with what varnishd runs now.
    Repaired,
}

/// A failed session, and whether it got as far as attaching (which resets the backoff).
struct SessionError {
    attached: bool,
    error: Error,
}

impl From<Error> for SessionError {
    fn from(error: Error) -> SessionError {
        SessionError {
            attached: false,
            error,
        }
    }
}

impl From<tonic::Status> for SessionError {
    fn from(status: tonic::Status) -> SessionError {
        SessionError::from(Error::Rpc(status))
    }
}

/// One attach stream: hello, then commands until the stream ends.
#[instrument(skip_all, fields(scheduler = %url, admin = %config.varnish_admin))]
async fn session(
    config: &Config,
    url: &str,
    endpoint: &Endpoint,
    executor: &mut Executor,
    shutdown: &CancellationToken,
) -> Result<Attached, SessionError> {
    if let Err(error) = executor.restore_last_good().await {
        warn!(error = %chain(&error), "cannot restore the last good vcl");
    }
    let state = executor.varnish_state().await?;
    executor.expect_active(&state.active_vcl_name);
    let channel = endpoint.connect().await.map_err(Error::Connect)?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(vaas_proto::MAX_AGENT_MESSAGE_BYTES);
    let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let hello = AgentHello {
        address: config.server_address.clone(),
        admin_port: u32::from(config.server_admin_port),
        hostname: config.hostname.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        varnish_version: state.varnish_version,
        active_vcl_name: state.active_vcl_name,
        active_vcl_version: state.active_vcl_version,
        unsafe_settings: state.unsafe_settings,
        cc_command: state.cc_command,
    };
    // The channel is empty and owned here: the first send cannot wait.
    let _ = outbound
        .send(AttachRequest {
            message: Some(attach_request::Message::Hello(hello)),
        })
        .await;
    let mut request = tonic::Request::new(ReceiverStream::new(outbound_rx));
    if let Some(path) = &config.token_file {
        request
            .metadata_mut()
            .insert("authorization", bearer_from_file(path).await?);
    }
    let response = tokio::time::timeout(config.rpc_timeout, client.attach(request))
        .await
        .map_err(|_| Error::AttachTimeout(config.rpc_timeout))??;
    let mut inbound = response.into_inner();
    info!(
        address = config.server_address,
        admin_port = config.server_admin_port,
        "attached to scheduler"
    );
    let failed = |error: Error| SessionError {
        attached: true,
        error,
    };

    let health_check = tokio::time::sleep(config.health_interval);
    tokio::pin!(health_check);
    // While varnishd cannot be reached: the delay before the next check.
    let mut unreachable: Option<Duration> = None;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(Attached::ShutDown),
            message = inbound.message() => message.map_err(|status| failed(status.into()))?,
            // Between commands only: the select owns the executor while a command runs.
            () = &mut health_check => {
                let checked = executor.check_health().await;
                // The check looked already: its own failures need no second look.
                executor.take_check_soon();
                let next = match checked {
                    Ok(None) => {
                        if unreachable.take().is_some() {
                            info!("varnishd is reachable again");
                        }
                        config.health_interval
                    }
                    Ok(Some(repair)) => {
                        warn!(
                            found = %repair.found,
                            done = %repair.done,
                            "varnishd does not run what the scheduler was told; attaching again"
                        );
                        return Ok(Attached::Repaired);
                    }
                    Err(error) => {
                        let delay = match unreachable {
                            None => {
                                warn!(error = %chain(&error), "varnishd cannot be reached; checking again");
                                INITIAL_BACKOFF
                            }
                            Some(delay) => delay * 2,
                        };
                        let delay = delay.min(config.health_interval);
                        unreachable = Some(delay);
                        delay
                    }
                };
                health_check.as_mut().reset(tokio::time::Instant::now() + next);
                continue;
            }
        };
        let Some(message) = message else {
            return Ok(Attached::Ended);
        };
        let mut committed = false;
        if let Err(refusal) = executor.admit_term(message.term) {
            warn!(term = message.term, %refusal, "refusing a command of an older scheduler term");
            let Some(reply) = refused(message.command, refusal) else {
                continue;
            };
            if outbound
                .send(AttachRequest {
                    message: Some(reply),
                })
                .await
                .is_err()
            {
                return Ok(Attached::Ended);
            }
            continue;
        }
        let reply = match message.command {
            Some(attach_response::Command::Prepare(command)) => {
                // Progress is for watchers: when the stream is full it is skipped, never waited for.
                let progress = outbound.clone();
                let on_rendered = move |update| {
                    let _ = progress.try_send(AttachRequest {
                        message: Some(attach_request::Message::PrepareProgress(update)),
                    });
                };
                attach_request::Message::PrepareResult(executor.prepare(command, on_rendered).await)
            }
            Some(attach_response::Command::Commit(command)) => {
                let result = executor.commit(&command).await;
                committed = result.ok;
                attach_request::Message::CommitResult(result)
            }
            Some(attach_response::Command::Abort(command)) => {
                attach_request::Message::AbortResult(executor.abort(command).await)
            }
            None => {
                warn!("ignoring an empty command");
                continue;
            }
        };
        let sent = outbound
            .send(AttachRequest {
                message: Some(reply),
            })
            .await;
        if sent.is_err() {
            // The request stream was dropped: the RPC is over, its status comes from `inbound`.
            warn!("attach request stream closed");
            return Ok(Attached::Ended);
        }
        // Housekeeping after the answer, so that it does not delay the caller's reload.
        if committed {
            executor.after_commit().await;
        }
        // A command that went through shows varnishd is fine; a CLI failure is looked into now.
        let next_check = if executor.take_check_soon() {
            tokio::time::Instant::now()
        } else {
            tokio::time::Instant::now() + config.health_interval
        };
        health_check.as_mut().reset(next_check);
    }
}

/// The answer to a command refused without running it (`None` for an empty command).
fn refused(
    command: Option<attach_response::Command>,
    error: String,
) -> Option<attach_request::Message> {
    use vaas_proto::v1::{AbortResult, CommitResult, PrepareResult};
    Some(match command? {
        attach_response::Command::Prepare(command) => {
            attach_request::Message::PrepareResult(PrepareResult {
                reload_id: command.reload_id,
                error,
                ..Default::default()
            })
        }
        attach_response::Command::Commit(command) => {
            attach_request::Message::CommitResult(CommitResult {
                reload_id: command.reload_id,
                error,
                ..Default::default()
            })
        }
        attach_response::Command::Abort(command) => {
            attach_request::Message::AbortResult(AbortResult {
                reload_id: command.reload_id,
                error,
                ..Default::default()
            })
        }
    })
}

/// Reads the token file into an `authorization` metadata value.
async fn bearer_from_file(path: &std::path::Path) -> Result<MetadataValue<Ascii>, Error> {
    let failed = |reason: String| Error::TokenFile {
        path: path.to_owned(),
        reason,
    };
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|error| failed(error.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(failed("the file is empty".to_owned()));
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| failed("the token holds characters a token never has".to_owned()))
}

/// Formats an error with its sources.
fn chain(error: &Error) -> String {
    vaas_runtime::error_chain(error)
}
