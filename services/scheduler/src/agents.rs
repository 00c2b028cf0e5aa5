//! The agents' side of the scheduler: the `AgentService.Attach` server and the registry of
//! attached agents, through which a reload sends one command at a time to a server's agent.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};
use vaas_proto::v1::agent_service_server::AgentService;
use vaas_proto::v1::attach_request::Message as AgentMessage;
use vaas_proto::v1::{AgentHello, AttachRequest, AttachResponse, ServerStatus, VarnishServer};
use vaas_store::Store;

use crate::ReloadRequest;

/// How long an agent has to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands and results queued per agent; an agent handles one command at a time.
const AGENT_QUEUE: usize = 8;

/// Identifies the agent of one Varnish server: its address and admin port as registered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AgentKey {
    /// VarnishServer.address.
    pub address: String,
    /// VarnishServer.admin_port.
    pub admin_port: u32,
}

/// What can go wrong sending a command to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No agent for that server is attached.
    #[error("no agent is attached for {address} admin port {admin_port}")]
    NotAttached {
        /// Server address.
        address: String,
        /// Server admin port.
        admin_port: u32,
    },
    /// The agent's stream ended before it answered.
    #[error("the agent disconnected before answering")]
    Disconnected,
    /// The agent did not answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// One attached agent.
#[derive(Debug)]
pub struct AgentLink {
    hello: AgentHello,
    generation: u64,
    commands: mpsc::Sender<AttachResponse>,
    results: tokio::sync::Mutex<mpsc::Receiver<AgentMessage>>,
}

impl AgentLink {
    /// Returns what the agent said when it attached.
    pub fn hello(&self) -> &AgentHello {
        &self.hello
    }

    /// Sends a command and waits for the agent's answer to it, skipping stale answers to earlier
    /// commands (`is_answer` tells the awaited answer apart).
    pub async fn call(
        &self,
        command: AttachResponse,
        timeout: Duration,
        is_answer: impl Fn(&AgentMessage) -> bool,
    ) -> Result<AgentMessage, AgentError> {
        self.call_observing(command, timeout, is_answer, |_| {})
            .await
    }

    /// Like [`AgentLink::call`], and shows every other message that arrives meanwhile (progress
    /// reports, late answers) to `observe`.
    pub async fn call_observing(
        &self,
        command: AttachResponse,
        timeout: Duration,
        is_answer: impl Fn(&AgentMessage) -> bool,
        mut observe: impl FnMut(&AgentMessage),
    ) -> Result<AgentMessage, AgentError> {
        // One command at a time per agent: the lock spans the send and the answer.
        let mut results = self.results.lock().await;
        self.commands
            .send(command)
            .await
            .map_err(|_| AgentError::Disconnected)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, results.recv()).await {
                Err(_) => return Err(AgentError::Timeout(timeout)),
                Ok(None) => return Err(AgentError::Disconnected),
                Ok(Some(message)) if is_answer(&message) => return Ok(message),
                Ok(Some(other)) => observe(&other),
            }
        }
    }
}

/// The attached agents, by server identity.
#[derive(Debug)]
pub struct AgentRegistry {
    agents: Mutex<HashMap<AgentKey, Arc<AgentLink>>>,
    changes: watch::Sender<u64>,
    next_generation: AtomicU64,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        AgentRegistry {
            agents: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
            next_generation: AtomicU64::new(1),
        }
    }
}

impl AgentRegistry {
    /// Returns the agent of a server, waiting up to `wait` for it to attach.
    pub async fn agent(
        &self,
        key: &AgentKey,
        wait: Duration,
    ) -> Result<Arc<AgentLink>, AgentError> {
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(link) = self.lookup(key) {
                return Ok(link);
            }
            let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Err(AgentError::NotAttached {
                    address: key.address.clone(),
                    admin_port: key.admin_port,
                });
            }
        }
    }

    fn lookup(&self, key: &AgentKey) -> Option<Arc<AgentLink>> {
        self.agents.lock().ok()?.get(key).cloned()
    }

    fn insert(&self, key: AgentKey, link: Arc<AgentLink>) {
        if let Ok(mut agents) = self.agents.lock() {
            agents.insert(key, link);
        }
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Removes the agent's stream `generation`; returns false when a newer stream of the same
    /// agent replaced it already (the agent is still attached).
    fn remove(&self, key: &AgentKey, generation: u64) -> bool {
        let mut removed = false;
        if let Ok(mut agents) = self.agents.lock()
            && agents
                .get(key)
                .is_some_and(|link| link.generation == generation)
        {
            agents.remove(key);
            removed = true;
        }
        self.changes.send_modify(|generation| *generation += 1);
        removed
    }

    /// Returns the identities of the attached agents.
    pub fn attached(&self) -> Vec<(String, u32)> {
        self.agents
            .lock()
            .map(|agents| {
                agents
                    .keys()
                    .map(|key| (key.address.clone(), key.admin_port))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The AgentService implementation.
#[derive(Clone, Debug)]
pub struct AgentApi {
    registry: Arc<AgentRegistry>,
    store: Store,
    reload_requests: mpsc::Sender<ReloadRequest>,
    terms: watch::Receiver<Option<CancellationToken>>,
    streams: TaskTracker,
}

impl AgentApi {
    /// Creates the service; an attaching agent's cluster is resynced through
    /// `reload_requests`. Agents are accepted only while `terms` holds a term of leadership,
    /// and their streams end with it; stream readers run on `streams`.
    pub fn new(
        registry: Arc<AgentRegistry>,
        store: Store,
        reload_requests: mpsc::Sender<ReloadRequest>,
        terms: watch::Receiver<Option<CancellationToken>>,
        streams: TaskTracker,
    ) -> AgentApi {
        AgentApi {
            registry,
            store,
            reload_requests,
            terms,
            streams,
        }
    }
}

impl AgentApi {
    /// Asks for a reload of the server's cluster so that a server that came back empty (or
    /// with another VCL) gets the current one; a server already up to date answers "unchanged".
    async fn resync(&self, server_id: i64) {
        let server = match self.store.get::<VarnishServer>(server_id).await {
            Ok(server) => server,
            Err(error) => {
                warn!(server = server_id, %error, "cannot read the attaching server");
                return;
            }
        };
        if server.status == ServerStatus::Disabled as i32 {
            return;
        }
        let request = ReloadRequest::Resync {
            cluster_id: server.cluster_id,
        };
        if self.reload_requests.send(request).await.is_err() {
            warn!(server = server_id, "the reload loop is gone; no resync");
        }
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type AttachStream = Pin<Box<dyn Stream<Item = Result<AttachResponse, Status>> + Send>>;

    #[instrument(skip_all, fields(rpc = "Attach"))]
    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let Some(term) = self.terms.borrow().clone() else {
            return Err(Status::unavailable(
                "this vaas-scheduler replica is standing by; attach to the leader",
            ));
        };
        // The auth layer admitted only agent tokens; the hello must name the token's server.
        let token = vaas_runtime::auth::caller(&request)
            .map(|caller| caller.token.clone())
            .ok_or_else(|| Status::unauthenticated("attach needs the agent's token"))?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(AttachRequest {
            message: Some(AgentMessage::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        let hello = checked_hello(hello).map_err(Status::invalid_argument)?;
        if let Err(status) = crate::auth::bound_server(&self.store, &token, &hello).await {
            warn!(
                token = %token.name,
                address = %hello.address,
                admin_port = hello.admin_port,
                reason = status.message(),
                "attach refused"
            );
            return Err(status);
        }
        let key = AgentKey {
            address: hello.address.clone(),
            admin_port: hello.admin_port,
        };
        let registered = self
            .store
            .record_agent_report(
                &hello.address,
                hello.admin_port,
                &hello.active_vcl_version,
                &vaas_store::VarnishSettings {
                    unsafe_settings: &hello.unsafe_settings,
                    cc_command: &hello.cc_command,
                },
            )
            .await
            .map_err(|error| Status::unavailable(format!("store: {error}")))?;
        info!(
            address = %hello.address,
            admin_port = hello.admin_port,
            hostname = %hello.hostname,
            varnish = %hello.varnish_version,
            active_vcl_version = %hello.active_vcl_version,
            active_vcl_name = %hello.active_vcl_name,
            server = ?registered,
            "agent attached"
        );
        let (commands, command_receiver) = mpsc::channel(AGENT_QUEUE);
        let (result_sender, results) = mpsc::channel(AGENT_QUEUE);
        let generation = self
            .registry
            .next_generation
            .fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(AgentLink {
            hello,
            generation,
            commands,
            results: tokio::sync::Mutex::new(results),
        });
        self.registry.insert(key.clone(), link);
        if let Some(server_id) = registered {
            self.resync(server_id).await;
        }
        let registry = self.registry.clone();
        let store = self.store.clone();
        self.streams.spawn(async move {
            let mut recheck = tokio::time::interval(TOKEN_RECHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            recheck.tick().await;
            loop {
                let message = tokio::select! {
                    message = inbound.next() => message,
                    // Leadership lost or shutdown: the agent reconnects, to the new leader.
                    () = term.cancelled() => break,
                    _ = recheck.tick() => {
                        if let Some(reason) = token_withdrawn(&store, token.id).await {
                            warn!(address = %key.address, admin_port = key.admin_port, %reason, "agent token withdrawn; detaching the agent");
                            break;
                        }
                        continue;
                    }
                };
                match message {
                    Some(Ok(AttachRequest { message: Some(message) })) => {
                        let message = match checked_result(message) {
                            Ok(message) => message,
                            Err(reason) => {
                                warn!(address = %key.address, admin_port = key.admin_port, %reason, "malformed agent message; detaching the agent");
                                break;
                            }
                        };
                        if result_sender.send(message).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(AttachRequest { message: None })) => {}
                    Some(Err(status)) => {
                        warn!(address = %key.address, admin_port = key.admin_port, %status, "agent stream failed");
                        break;
                    }
                    None => break,
                }
            }
            if registry.remove(&key, generation)
                && let Err(error) = store
                    .record_agent_attached(&key.address, key.admin_port, false)
                    .await
            {
                warn!(%error, "cannot record that an agent detached");
            }
            info!(address = %key.address, admin_port = key.admin_port, "agent detached");
        });
        let outbound = ReceiverStream::new(command_receiver).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// How often the token of an attached agent is checked again, so that revoking it (or its
/// expiry) detaches the agent within this long.
const TOKEN_RECHECK: Duration = Duration::from_secs(15);

/// Returns why an attached agent's token no longer works, or `None` while it does (or while the
/// store cannot tell: an outage of the store does not cut agents off).
async fn token_withdrawn(store: &Store, token_id: i64) -> Option<String> {
    match store.recheck_token(token_id).await {
        Ok(authentication) => authentication.valid().err(),
        Err(error) => {
            warn!(%error, "cannot recheck an agent token");
            None
        }
    }
}

/// One text field of a hello: its name, value, longest length and allowed characters.
type FieldCheck<'a> = (&'static str, &'a str, usize, fn(char) -> bool);

/// The longest host name a hello may carry (DNS's limit).
const MAX_HOSTNAME_CHARS: usize = 253;

/// The longest version or VCL name a hello may carry.
const MAX_HELLO_FIELD_CHARS: usize = 128;

/// Longest `cc_command` an agent may report.
const MAX_CC_COMMAND_CHARS: usize = 1024;

/// Checks every field of a hello before anything is stored or logged: the address becomes its
/// canonical spelling (as the API stores it), and every text is short and made only of the
/// characters it needs, so that an agent can neither grow the store and the logs nor forge a log
/// line.
fn checked_hello(mut hello: AgentHello) -> Result<AgentHello, String> {
    let address: std::net::IpAddr = hello
        .address
        .parse()
        .map_err(|_| "hello.address must be an IP address".to_owned())?;
    hello.address = address.to_canonical().to_string();
    if !(1..=65535).contains(&hello.admin_port) {
        return Err("hello.admin_port must be a port from 1 to 65535".to_owned());
    }
    let fits = |value: &str, max: usize, allowed: fn(char) -> bool| {
        value.chars().count() <= max && value.chars().all(allowed)
    };
    let hostname_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let version_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | ' ' | '(' | ')');
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let checks: [FieldCheck<'_>; 5] = [
        (
            "hostname",
            &hello.hostname,
            MAX_HOSTNAME_CHARS,
            hostname_char,
        ),
        (
            "agent_version",
            &hello.agent_version,
            MAX_HELLO_FIELD_CHARS,
            version_char,
        ),
        (
            "varnish_version",
            &hello.varnish_version,
            MAX_HELLO_FIELD_CHARS,
            version_char,
        ),
        (
            "active_vcl_name",
            &hello.active_vcl_name,
            MAX_HELLO_FIELD_CHARS,
            name_char,
        ),
        (
            "active_vcl_version",
            &hello.active_vcl_version,
            MAX_HELLO_FIELD_CHARS,
            name_char,
        ),
    ];
    for (field, value, max, allowed) in checks {
        if !fits(value, max, allowed) {
            return Err(format!(
                "hello.{field} must be at most {max} characters of letters, digits and punctuation \
                 it needs, without spaces or control characters"
            ));
        }
    }
    let finding_ok = |finding: &String| {
        finding.chars().count() <= MAX_HELLO_FIELD_CHARS
            && finding.chars().all(|c| c.is_ascii_graphic() || c == ' ')
    };
    if hello.unsafe_settings.len() > MAX_UNSAFE_SETTINGS
        || !hello.unsafe_settings.iter().all(finding_ok)
    {
        return Err(format!(
            "hello.unsafe_settings must hold at most {MAX_UNSAFE_SETTINGS} findings of at most \
             {MAX_HELLO_FIELD_CHARS} printable characters"
        ));
    }
    let command_ok = hello.cc_command.chars().count() <= MAX_CC_COMMAND_CHARS
        && hello
            .cc_command
            .chars()
            .all(|c| c.is_ascii_graphic() || c == ' ');
    if !command_ok {
        return Err(format!(
            "hello.cc_command must be at most {MAX_CC_COMMAND_CHARS} printable ASCII characters"
        ));
    }
    Ok(hello)
}

/// The most findings about unsafe varnishd settings a hello may carry.
const MAX_UNSAFE_SETTINGS: usize = 16;

/// Checks a result from an agent before the scheduler acts on it, logs it or stores it: ids,
/// names and versions are short and made of the characters they need (so an agent can forge
/// neither a log line nor a command to another VCL), and an error (a compiler message may be
/// hundreds of KiB) is cut to what a task keeps.
fn checked_result(message: AgentMessage) -> Result<AgentMessage, String> {
    let name_ok = |value: &str| {
        value.chars().count() <= MAX_HELLO_FIELD_CHARS
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    let cap = |error: &mut String| {
        if error.chars().count() > vaas_store::TASK_ERROR_MAX_CHARS {
            *error = error
                .chars()
                .take(vaas_store::TASK_ERROR_MAX_CHARS)
                .collect();
        }
    };
    let (kind, names) = match &message {
        AgentMessage::Hello(_) => return Err("a second hello".to_owned()),
        AgentMessage::PrepareResult(result) => (
            "prepare_result",
            vec![&result.reload_id, &result.vcl_name, &result.vcl_version],
        ),
        AgentMessage::CommitResult(result) => (
            "commit_result",
            vec![&result.reload_id, &result.active_vcl_version],
        ),
        AgentMessage::AbortResult(result) => ("abort_result", vec![&result.reload_id]),
        AgentMessage::PrepareProgress(progress) => (
            "prepare_progress",
            vec![&progress.reload_id, &progress.vcl_version],
        ),
    };
    if !names.into_iter().all(|name| name_ok(name)) {
        return Err(format!(
            "{kind} holds an id, name or version that is too long or has characters it never has"
        ));
    }
    let mut message = message;
    match &mut message {
        AgentMessage::PrepareResult(result) => cap(&mut result.error),
        AgentMessage::CommitResult(result) => cap(&mut result.error),
        AgentMessage::AbortResult(result) => cap(&mut result.error),
        AgentMessage::Hello(_) | AgentMessage::PrepareProgress(_) => {}
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> AgentHello {
        AgentHello {
            address: "::ffff:127.0.0.1".into(),
            admin_port: 6082,
            hostname: "cache-1.example".into(),
            agent_version: "0.1.0".into(),
            varnish_version: "varnish-7.1.1 revision 7cee1c5".into(),
            active_vcl_name: "vaas-1a2b".into(),
            active_vcl_version: "0123456789abcdef".into(),
            unsafe_settings: vec!["vcc_unsafe_path is on".into()],
            cc_command: "exec gcc -O2 -fpic -shared -o %o %s".into(),
        }
    }

    #[test]
    fn results_with_forged_names_are_refused_and_long_errors_are_cut() {
        use vaas_proto::v1::{CommitResult, PrepareResult};
        let prepared = AgentMessage::PrepareResult(PrepareResult {
            reload_id: "r-1".into(),
            ok: false,
            vcl_name: "vaas-1a2b".into(),
            vcl_version: "1a2b".into(),
            error: "x".repeat(vaas_store::TASK_ERROR_MAX_CHARS * 100),
            ..Default::default()
        });
        match checked_result(prepared) {
            Ok(AgentMessage::PrepareResult(result)) => {
                assert_eq!(
                    result.error.chars().count(),
                    vaas_store::TASK_ERROR_MAX_CHARS
                );
            }
            other => panic!("a long compiler message is cut, not refused: {other:?}"),
        }
        let forged = AgentMessage::CommitResult(CommitResult {
            reload_id: "r-1".into(),
            ok: true,
            active_vcl_version: "v1\nINFO reload succeeded".into(),
            ..Default::default()
        });
        assert!(checked_result(forged).is_err());
        let huge = AgentMessage::CommitResult(CommitResult {
            reload_id: "r".repeat(10_000),
            ..Default::default()
        });
        assert!(checked_result(huge).is_err());
        assert!(checked_result(AgentMessage::Hello(hello())).is_err());
    }

    #[test]
    fn a_well_formed_hello_passes_with_its_address_canonical() {
        assert_eq!(checked_hello(hello()).unwrap().address, "127.0.0.1");
    }

    #[test]
    fn oversized_or_forged_fields_are_refused() {
        let forged_line = AgentHello {
            hostname: "cache-1\nINFO agent attached address=10.0.0.9".into(),
            ..hello()
        };
        let error = checked_hello(forged_line).unwrap_err();
        assert!(error.starts_with("hello.hostname"), "{error}");
        let huge = AgentHello {
            varnish_version: "x".repeat(3 * 1024 * 1024),
            ..hello()
        };
        assert!(
            checked_hello(huge)
                .unwrap_err()
                .starts_with("hello.varnish_version")
        );
        for bad in [
            AgentHello {
                address: "cache-1".into(),
                ..hello()
            },
            AgentHello {
                admin_port: 0,
                ..hello()
            },
            AgentHello {
                admin_port: 70_000,
                ..hello()
            },
        ] {
            assert!(checked_hello(bad).is_err());
        }
    }
}
