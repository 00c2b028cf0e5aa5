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
                Ok(Some(_stale)) => continue,
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

    fn remove(&self, key: &AgentKey, generation: u64) {
        if let Ok(mut agents) = self.agents.lock() {
            // A newer stream of the same agent may have replaced this one already.
            if agents
                .get(key)
                .is_some_and(|link| link.generation == generation)
            {
                agents.remove(key);
            }
        }
        self.changes.send_modify(|generation| *generation += 1);
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
        if hello.address.is_empty() || hello.admin_port == 0 {
            return Err(Status::invalid_argument(
                "hello needs address and admin_port",
            ));
        }
        let key = AgentKey {
            address: hello.address.clone(),
            admin_port: hello.admin_port,
        };
        let registered = self
            .store
            .record_agent_report(&hello.address, hello.admin_port, &hello.active_vcl_version)
            .await
            .map_err(|error| Status::unavailable(format!("store: {error}")))?;
        info!(
            address = %hello.address,
            admin_port = hello.admin_port,
            hostname = %hello.hostname,
            varnish = %hello.varnish_version,
            active_vcl_version = %hello.active_vcl_version,
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
        self.streams.spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.next() => message,
                    // Leadership lost or shutdown: the agent reconnects, to the new leader.
                    () = term.cancelled() => break,
                };
                match message {
                    Some(Ok(AttachRequest { message: Some(message) })) => {
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
            registry.remove(&key, generation);
            info!(address = %key.address, admin_port = key.admin_port, "agent detached");
        });
        let outbound = ReceiverStream::new(command_receiver).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }
}
