//! vaas-scheduler: keeps the newest reload intent per cluster and drives two-phase reloads
//! (prepare everywhere, then commit everywhere or abort) through the agents attached to its
//! `AgentService`.
//!
//! Decisions live in the pure [`machine::ReloadMachine`]; this crate's loop feeds it intents from
//! JetStream and from the store (reconciliation, so a lost message or a restart never leaves a
//! task hanging) and runs the reloads it asks for. It never renders VCL (agents do) and never
//! writes configuration (the API does).

pub mod agents;
pub mod auth;
pub mod leader;
pub mod machine;
pub mod progress;
pub mod reload;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use vaas_proto::v1::agent_service_server::AgentServiceServer;
use vaas_store::Store;

use vaas_runtime::auth::AuthLayer;

use crate::agents::{AgentApi, AgentRegistry};
use crate::auth::AgentAuthenticator;
use crate::machine::{Action, ReloadEnd, ReloadMachine, RetryPolicy};
use crate::reload::{ReloadContext, ReloadTimeouts};

/// Name of the durable JetStream consumer the scheduler reads intents with.
pub const CONSUMER_NAME: &str = "vaas-scheduler";

/// Intents queued between the JetStream reader and the reload loop.
const INTENT_QUEUE: usize = 1024;

/// How often the store is scanned for unfinished tasks while intents cannot be read from
/// JetStream (instead of `--reconcile-interval`): a NATS outage delays a reload by about its
/// own length, not more.
const SCAN_INTERVAL_WITHOUT_INTENTS: Duration = Duration::from_secs(1);

/// How often the intent reader checks that its connection to NATS is up.
const NATS_CONNECTION_CHECK: Duration = Duration::from_millis(250);

/// Why the reload loop should look at a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadRequest {
    /// The cluster has a change up to `timestamp` (from JetStream or the store scan).
    Intent {
        /// The cluster.
        cluster_id: i64,
        /// The change's store timestamp.
        timestamp: i64,
    },
    /// An agent of the cluster (re)attached: make sure its server runs the current VCL.
    Resync {
        /// The cluster.
        cluster_id: i64,
    },
}

/// Configuration of vaas-scheduler; every flag can also be set through its environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Store URL: `sqlite://path/vaas.db?mode=rwc` or `postgres://user:pass@host/db`.
    #[arg(
        long,
        env = "VAAS_DATABASE_URL",
        default_value = "sqlite://vaas.db?mode=rwc"
    )]
    pub database_url: String,
    /// NATS server URL (JetStream enabled, version 2.10 or newer).
    #[arg(long, env = "VAAS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// How to authenticate to NATS (`--nats-user` and `--nats-password-file`).
    #[command(flatten)]
    pub nats_auth: vaas_bus::NatsAuth,
    /// How often the store is scanned for unfinished tasks.
    #[arg(long, env = "VAAS_RECONCILE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
    /// How long a reload waits for a server's agent to attach.
    #[arg(long, env = "VAAS_AGENT_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub agent_wait: Duration,
    /// How long an agent may take to render and compile a VCL.
    #[arg(long, env = "VAAS_PREPARE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub prepare_timeout: Duration,
    /// Time to live of the leader lease: a replica that stops renewing loses leadership after
    /// this long, and a standby takes over.
    #[arg(long, env = "VAAS_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// Name of this replica in the leader lease [default: host name and process id].
    #[arg(long, env = "VAAS_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How long an agent may take to activate or discard a VCL.
    #[arg(long, env = "VAAS_COMMIT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub commit_timeout: Duration,
    /// Attempts of a reload that fails transiently (an agent unreachable, gone or too slow),
    /// the first included; its tasks wait in state RETRY between attempts, 1 s, 2 s, 4 s … (at
    /// most 30 s) apart. A compile error is never retried.
    #[arg(long, env = "VAAS_RELOAD_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub reload_attempts: u32,
    /// TLS of the gRPC server the agents attach to (plaintext when not configured); with
    /// `--tls-client-ca`, only agents with a client certificate signed by it are served.
    #[command(flatten)]
    pub tls: vaas_runtime::tls::ServerTls,
}

/// What stops the scheduler from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened or migrated.
    #[error("cannot open the store")]
    Store(#[from] vaas_store::Error),
    /// NATS could not be reached.
    #[error("cannot connect to nats")]
    Bus(#[from] vaas_bus::Error),
    /// The gRPC server failed.
    #[error("grpc server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS flags name missing or unusable files.
    #[error("bad tls configuration")]
    Tls(#[from] vaas_runtime::tls::TlsError),
}

/// Serves the AgentService on `listener` and, while this replica holds the leader lease, drives
/// reloads; at `shutdown` lets running reloads finish, releases the lease and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // Checked first: a TLS mistake is reported before any connection is made.
    let (server, tls_on) = config.tls.server_builder()?;
    let store = Store::connect(&config.database_url).await?;
    // Returns at once when NATS cannot be reached yet (the client keeps trying in the
    // background): leadership lives in the store, and work is found there until NATS is back.
    let (nats, jetstream) =
        vaas_bus::connect(&config.nats_url, "vaas-scheduler", &config.nats_auth).await?;
    let replica = config.replica_id.clone().unwrap_or_else(default_replica_id);
    let registry = Arc::new(AgentRegistry::default());
    let background = TaskTracker::new();
    let (term_sender, terms) = watch::channel(None);
    let (term_number_sender, term_numbers) = watch::channel(0);
    background.spawn(leader::run_election(
        leader::Candidate {
            store: store.clone(),
            replica,
            lease_ttl: config.lease_ttl,
        },
        term_sender,
        term_number_sender,
        shutdown.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    // Standing by until elected: load balancers and agents look for the serving replica.
    health
        .set_not_serving::<AgentServiceServer<AgentApi>>()
        .await;
    let reflection = vaas_runtime::reflection()?;
    let (request_sender, requests) = mpsc::channel(INTENT_QUEUE);
    let agent_api = AgentApi::new(
        registry.clone(),
        store.clone(),
        request_sender.clone(),
        terms.clone(),
        background.clone(),
    );
    let progress = progress::ProgressRecorder::new(store.clone(), nats.clone());
    background.spawn(progress.clone().run_writer(shutdown.clone()));
    let leader_work = LeaderWork {
        jetstream,
        term_numbers,
        requests,
        request_sender,
        health,
        reconcile_interval: config.reconcile_interval,
        retries: RetryPolicy {
            attempts: config.reload_attempts,
            ..RetryPolicy::default()
        },
        context: ReloadContext {
            store: store.clone(),
            agents: registry,
            nats,
            timeouts: ReloadTimeouts {
                agent_wait: config.agent_wait,
                prepare: config.prepare_timeout,
                commit: config.commit_timeout,
            },
            progress,
            term: CancellationToken::new(),
            term_number: 0,
        },
    };
    background.spawn(leader_work.run_terms(terms, shutdown.clone()));
    info!(address = ?listener.local_addr().ok(), tls = tls_on, "vaas-scheduler serving");
    let served = server
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(AuthLayer::new(AgentAuthenticator::new(store.clone())))
        .add_service(health_service)
        .add_service(reflection.v1)
        .add_service(reflection.v1alpha)
        .add_service(
            AgentServiceServer::new(agent_api)
                .max_decoding_message_size(vaas_proto::MAX_AGENT_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await;
    shutdown.cancel();
    background.close();
    background.wait().await;
    store.close().await;
    info!("vaas-scheduler stopped");
    Ok(served?)
}

/// Returns "host:pid", unique enough among the replicas of one installation.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "scheduler".to_owned());
    format!("{host}:{}", std::process::id())
}

/// What this replica does while it leads: read intents and drive reloads.
struct LeaderWork {
    jetstream: async_nats::jetstream::Context,
    /// The number of the newest term, which fences the term's work.
    term_numbers: watch::Receiver<i64>,
    requests: mpsc::Receiver<ReloadRequest>,
    request_sender: mpsc::Sender<ReloadRequest>,
    health: tonic_health::server::HealthReporter,
    reconcile_interval: Duration,
    retries: RetryPolicy,
    context: ReloadContext,
}

impl LeaderWork {
    /// Works through every term of leadership until `shutdown`.
    async fn run_terms(
        mut self,
        mut terms: watch::Receiver<Option<CancellationToken>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let term = loop {
                // A cancelled token is a term that is ending: waiting for the next one instead
                // of starting work that ends at once keeps the loop from spinning.
                if let Some(term) = terms.borrow_and_update().clone()
                    && !term.is_cancelled()
                {
                    break term;
                }
                tokio::select! {
                    changed = terms.changed() => if changed.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
            };
            self.health
                .set_serving::<AgentServiceServer<AgentApi>>()
                .await;
            let context = ReloadContext {
                term: term.clone(),
                term_number: *self.term_numbers.borrow(),
                store: self.context.store.fenced(*self.term_numbers.borrow()),
                ..self.context.clone()
            };
            let (intents_flowing, intents_flowing_watch) = watch::channel(false);
            let span = info_span!("term", number = *self.term_numbers.borrow());
            async {
                tokio::join!(
                    read_intents(
                        self.jetstream.clone(),
                        self.request_sender.clone(),
                        intents_flowing,
                        term.clone()
                    ),
                    drive_reloads(
                        context,
                        &mut self.requests,
                        ScanIntervals {
                            intents_flowing: self.reconcile_interval,
                            without_intents: SCAN_INTERVAL_WITHOUT_INTENTS,
                        },
                        intents_flowing_watch,
                        self.retries,
                        term
                    ),
                )
            }
            .instrument(span)
            .await;
            self.health
                .set_not_serving::<AgentServiceServer<AgentApi>>()
                .await;
            if shutdown.is_cancelled() {
                return;
            }
        }
    }
}

/// Forwards intents from the JetStream stream to the reload loop until `shutdown`; `flowing`
/// says whether intents are being read. Whenever the connection to NATS drops, reading starts
/// over once it is back, creating the stream and the consumer when they are missing (a NATS that
/// lost its data).
async fn read_intents(
    jetstream: async_nats::jetstream::Context,
    sender: mpsc::Sender<ReloadRequest>,
    flowing: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let client = jetstream.client();
    let mut failures: u32 = 0;
    while !shutdown.is_cancelled() {
        let outcome = tokio::select! {
            outcome = read_intents_once(&jetstream, &sender, &flowing) => outcome,
            () = shutdown.cancelled() => return,
        };
        if flowing.send_replace(false) {
            // Intents flowed since the last failure: this one starts a new count.
            failures = 0;
        }
        if let Err(error) = outcome {
            failures = failures.saturating_add(1);
            warn!(
                %error,
                failures,
                scan_every = ?SCAN_INTERVAL_WITHOUT_INTENTS,
                "reading intents failed; finding work in the store until they flow again"
            );
        }
        // A quick retry (the store is scanned meanwhile), but never a tight loop.
        let pause = Duration::from_millis(100 * 2u64.pow(failures.min(4)));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
        // Requests sent while disconnected would only wait for their timeout.
        while client.connection_state() != async_nats::connection::State::Connected {
            tokio::select! {
                () = tokio::time::sleep(NATS_CONNECTION_CHECK) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Reads intents until an error, a dropped connection or the end of the reload loop.
async fn read_intents_once(
    jetstream: &async_nats::jetstream::Context,
    sender: &mpsc::Sender<ReloadRequest>,
    flowing: &watch::Sender<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = jetstream.client();
    // Counted before anything is read, so that a reconnection from here on restarts reading.
    let connects = client.statistics().connects.load(Ordering::Relaxed);
    // Both are created when missing, on every (re)start of reading.
    let stream = vaas_bus::intents_stream(jetstream).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            CONSUMER_NAME,
            pull::Config {
                durable_name: Some(CONSUMER_NAME.to_owned()),
                // On first start only the newest intent of each cluster matters.
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ack_policy: consumer::AckPolicy::Explicit,
                filter_subject: vaas_bus::INTENT_SUBJECTS.to_owned(),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut connection_check = tokio::time::interval(NATS_CONNECTION_CHECK);
    flowing.send_replace(true);
    info!("reading reload intents");
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            // The pull stream would notice a lost connection only after its idle heartbeats, and
            // a NATS that restarted (perhaps without its stream) only after several retries.
            _ = connection_check.tick() => {
                if client.connection_state() != async_nats::connection::State::Connected
                    || client.statistics().connects.load(Ordering::Relaxed) != connects
                {
                    return Err("the connection to nats dropped".into());
                }
                continue;
            }
        };
        let Some(message) = message else {
            return Ok(());
        };
        let message = message?;
        match vaas_bus::decode::<vaas_bus::Intent>(&message.payload) {
            Ok(intent) => {
                debug!(cluster = intent.cluster_id, task = intent.task_id, "intent");
                let request = ReloadRequest::Intent {
                    cluster_id: intent.cluster_id,
                    timestamp: intent.timestamp,
                };
                sender.send(request).await?;
            }
            Err(error) => warn!(%error, subject = %message.subject, "dropping a malformed intent"),
        }
        // Acked once handed over: the store reconciliation covers a crash after this point.
        message.ack().await?;
    }
}

/// How often the reload loop scans the store for unfinished tasks.
#[derive(Clone, Copy, Debug)]
struct ScanIntervals {
    /// While intents are read from JetStream: a safety net for a lost message.
    intents_flowing: Duration,
    /// While they are not (NATS down or being reconnected to): the only way work is found.
    without_intents: Duration,
}

impl ScanIntervals {
    /// Returns the interval that fits whether intents flow.
    fn current(&self, intents_flowing: bool) -> Duration {
        if intents_flowing {
            self.intents_flowing
        } else {
            self.without_intents.min(self.intents_flowing)
        }
    }
}

/// The reload loop: feeds intents, resync requests and reload ends to the machine and runs the reloads it asks
/// for, one per cluster at a time; scans the store for unfinished tasks at start and then at
/// the interval that fits whether `intents_flowing`.
async fn drive_reloads(
    context: ReloadContext,
    requests: &mut mpsc::Receiver<ReloadRequest>,
    scans: ScanIntervals,
    mut intents_flowing: watch::Receiver<bool>,
    retries: RetryPolicy,
    shutdown: CancellationToken,
) {
    // Agents of an earlier leader may be gone: only those attached here count as attached.
    if let Err(error) = context
        .store
        .reset_agents_attached(&context.agents.attached())
        .await
    {
        warn!(%error, "cannot record which agents are attached");
    }
    let mut machine = ReloadMachine::with_retries(retries);
    let reloads = TaskTracker::new();
    let (end_sender, mut ends) = mpsc::channel::<(i64, ReloadEnd)>(INTENT_QUEUE);
    let (retry_sender, mut retries_due) = mpsc::channel::<i64>(INTENT_QUEUE);
    let mut next_scan = tokio::time::Instant::now();
    loop {
        let actions = tokio::select! {
            Some(request) = requests.recv() => match request {
                ReloadRequest::Intent { cluster_id, timestamp } => machine.on_intent(cluster_id, timestamp),
                ReloadRequest::Resync { cluster_id } => machine.on_resync(cluster_id),
            },
            Some((cluster_id, end)) = ends.recv() => machine.on_reload_end(cluster_id, end),
            Some(cluster_id) = retries_due.recv() => machine.on_retry_due(cluster_id),
            Ok(()) = intents_flowing.changed() => {
                // Intents stopped (or came back): scan on the schedule that fits from now on.
                let interval = scans.current(*intents_flowing.borrow_and_update());
                next_scan = next_scan.min(tokio::time::Instant::now() + interval);
                Vec::new()
            }
            () = tokio::time::sleep_until(next_scan) => {
                next_scan = tokio::time::Instant::now() + scans.current(*intents_flowing.borrow());
                match context.store.unfinished_clusters().await {
                    Ok(unfinished) => unfinished
                        .into_iter()
                        .flat_map(|(cluster_id, newest)| machine.on_intent(cluster_id, newest))
                        .collect(),
                    Err(error) => {
                        warn!(%error, "cannot scan the store for unfinished tasks");
                        Vec::new()
                    }
                }
            }
            () = shutdown.cancelled() => break,
        };
        for action in actions {
            let cluster_id = match action {
                Action::StartReload { cluster_id } => cluster_id,
                Action::RetryLater { cluster_id, delay } => {
                    let retry_sender = retry_sender.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {
                                let _ = retry_sender.send(cluster_id).await;
                            }
                            () = shutdown.cancelled() => {}
                        }
                    });
                    continue;
                }
            };
            let last_attempt = machine.is_last_attempt(cluster_id);
            let context = context.clone();
            let end_sender = end_sender.clone();
            reloads.spawn(async move {
                let end = match reload::reload_cluster(&context, cluster_id, last_attempt).await {
                    Ok(reload::Ended::Finished(snapshot_version)) => {
                        ReloadEnd::Finished { snapshot_version }
                    }
                    Ok(reload::Ended::Retry) => ReloadEnd::Retry,
                    Err(error) => {
                        warn!(cluster = cluster_id, %error, "reload interrupted");
                        ReloadEnd::Interrupted
                    }
                };
                let _ = end_sender.send((cluster_id, end)).await;
            });
        }
    }
    info!(
        running = machine.running_count(),
        "waiting for running reloads to finish"
    );
    reloads.close();
    reloads.wait().await;
}
