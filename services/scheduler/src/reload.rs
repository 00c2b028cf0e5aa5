//! One cluster reload: snapshot, prepare on every server, then commit everywhere or abort
//! everywhere, and finish the tasks the snapshot covered.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tracing::{info, instrument, warn};
use vaas_proto::v1::attach_request::Message as AgentMessage;
use vaas_proto::v1::attach_response::Command;
use vaas_proto::v1::{
    AbortCommand, AttachResponse, ClusterSnapshot, CommitCommand, PrepareCommand, PrepareResult,
    ServerPhase, ServerReloadProgress, ServerStatus, Task, VarnishServer,
};
use vaas_store::{Store, TaskOutcome};

use crate::agents::{AgentKey, AgentLink, AgentRegistry};
use crate::progress::{self, ProgressRecorder};

/// Time limits of a reload.
#[derive(Clone, Copy, Debug)]
pub struct ReloadTimeouts {
    /// How long to wait for a server's agent to attach.
    pub agent_wait: Duration,
    /// How long an agent may take to render and load (compile) a VCL.
    pub prepare: Duration,
    /// How long an agent may take to activate or discard a VCL.
    pub commit: Duration,
}

/// What a reload needs from the outside world.
#[derive(Clone, Debug)]
pub struct ReloadContext {
    /// The configuration store.
    pub store: Store,
    /// The attached agents.
    pub agents: Arc<AgentRegistry>,
    /// NATS, for task events.
    pub nats: async_nats::Client,
    /// Time limits.
    pub timeouts: ReloadTimeouts,
    /// Where each server stands in the reloads, for watchers.
    pub progress: Arc<ProgressRecorder>,
    /// This replica's term of leadership: once cancelled, reloads leave their tasks unfinished
    /// for the next leader.
    pub term: tokio_util::sync::CancellationToken,
    /// The number of that term, sent with every command: agents refuse commands of a term
    /// older than one they have seen.
    pub term_number: i64,
}

/// Numbers reloads within this process, so that a reload id never repeats (a late answer to an
/// earlier reload of the same snapshot cannot pass for an answer to this one).
static RELOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A failure that stops a reload before it could finish its tasks.
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    /// The store failed.
    #[error("reload interrupted: {0}")]
    Store(#[from] vaas_store::Error),
    /// This replica stopped leading; the next leader runs the reload again.
    #[error("reload interrupted: this replica stopped leading")]
    LeadershipLost,
}

struct Prepared {
    server: VarnishServer,
    link: Option<Arc<AgentLink>>,
    result: Result<PrepareResult, String>,
    /// Where the server stands after the prepare phase.
    progress: ServerReloadProgress,
}

impl Prepared {
    fn loaded_vcl(&self) -> Option<(&Arc<AgentLink>, &str)> {
        let result = self.result.as_ref().ok()?;
        let link = self.link.as_ref()?;
        (result.ok && !result.unchanged).then_some((link, result.vcl_name.as_str()))
    }

    fn describe(&self) -> String {
        format!(
            "server {} ({}:{})",
            self.server.id,
            self.server.address,
            self.server.admin_port.unwrap_or_default()
        )
    }
}

/// How a reload ended for its tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The tasks up to this snapshot version are finished (succeeded or failed for good).
    Finished(i64),
    /// The reload failed transiently; the tasks wait in state RETRY.
    Retry,
}

/// A server's failure in a reload, and whether trying again may help: an agent that was not
/// attached, went away or did not answer in time may be back; a compile error will not change.
struct Failure {
    message: String,
    transient: bool,
}

/// Reloads one cluster and finishes its tasks, or leaves them in RETRY after a transient failure
/// unless this is the `last_attempt`.
#[instrument(skip_all, fields(cluster = cluster_id))]
pub async fn reload_cluster(
    context: &ReloadContext,
    cluster_id: i64,
    last_attempt: bool,
) -> Result<Ended, Interrupted> {
    let snapshot = context.store.cluster_snapshot(cluster_id).await?;
    let version = snapshot.version;
    let started = context.store.start_tasks(cluster_id, version).await?;
    announce(&context.nats, &started).await;
    let sequence = RELOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let reload_id = format!("{cluster_id}-{version}-t{}-{sequence}", context.term_number);
    let (failures, syncs) = run_two_phases(context, &snapshot, &reload_id).await;
    // Watchers see every server's final phase before they see the tasks finish.
    context.progress.flush().await;
    let transient = failures.iter().all(|failure| failure.transient);
    let message = capped(
        failures
            .into_iter()
            .map(|failure| failure.message)
            .collect::<Vec<_>>()
            .join("; "),
    );
    let outcome = match (message.is_empty(), transient, last_attempt) {
        (true, _, _) => TaskOutcome::Success,
        (false, true, false) => TaskOutcome::Retry(message),
        (false, true, true) => TaskOutcome::Failure(format!("{message} (no attempts left)")),
        (false, false, _) => TaskOutcome::Failure(message),
    };
    match &outcome {
        TaskOutcome::Success => info!(version, "reload succeeded"),
        TaskOutcome::Failure(error) => warn!(version, ?error, "reload failed"),
        TaskOutcome::Retry(error) => warn!(version, ?error, "reload failed; retrying later"),
    }
    // What a reload cut short by a lost leadership saw is not what the servers run.
    if !context.term.is_cancelled() {
        let syncs: Vec<(i64, Option<&str>)> = syncs
            .iter()
            .map(|sync| (sync.server_id, sync.error.as_deref()))
            .collect();
        if let Err(error) = context.store.record_server_syncs(version, &syncs).await {
            warn!(servers = syncs.len(), %error, "cannot record what the servers run");
        }
    }
    if context.term.is_cancelled() {
        // What the agents answered may be a side effect of losing leadership (streams closed):
        // leave the tasks to the next leader rather than record a failure that was not one.
        return Err(Interrupted::LeadershipLost);
    }
    let finished = context
        .store
        .finish_tasks(cluster_id, version, &outcome)
        .await?;
    announce(&context.nats, &finished).await;
    Ok(match outcome {
        TaskOutcome::Retry(_) => Ended::Retry,
        TaskOutcome::Success | TaskOutcome::Failure(_) => Ended::Finished(version),
    })
}

async fn announce(nats: &async_nats::Client, tasks: &[Task]) {
    for task in tasks {
        let event = vaas_bus::TaskEvent {
            task_id: task.id,
            state: task.state,
        };
        if let Err(error) = vaas_bus::publish_task_event(nats, &event).await {
            // Watchers re-read the store on their own schedule; a lost event only delays them.
            warn!(task = task.id, %error, "cannot publish task event");
        }
    }
}

async fn run_two_phases(
    context: &ReloadContext,
    snapshot: &ClusterSnapshot,
    reload_id: &str,
) -> (Vec<Failure>, Vec<ServerSync>) {
    let partial_reload = snapshot
        .cluster
        .as_ref()
        .is_some_and(|cluster| cluster.partial_reload);
    // An agent renders its own server alone: sending every server of the cluster to every
    // agent would make a reload's traffic and memory grow with the square of its servers.
    let for_agents = ClusterSnapshot {
        servers: Vec::new(),
        ..snapshot.clone()
    };
    let prepared = join_all(
        snapshot
            .servers
            .iter()
            .map(|server| prepare(context, &for_agents, server, reload_id)),
    )
    .await;

    let mut failures = Vec::new();
    let mut syncs = Vec::new();
    for entry in &prepared {
        let (error, transient) = match &entry.result {
            Ok(result) if result.ok => continue,
            // The agent answered: the VCL does not compile, which trying again won't fix, or
            // its varnishd could not be reached, which may pass.
            Ok(result) => (result.error.clone(), result.transient),
            Err(error) => (error.clone(), true),
        };
        syncs.push(ServerSync {
            server_id: entry.server.id,
            error: Some(capped(error.clone())),
        });
        let maintenance = entry.server.status == ServerStatus::Maintenance as i32;
        let unreachable = entry.link.is_none() || entry.result.is_err();
        if maintenance || (partial_reload && unreachable) {
            warn!(server = entry.server.id, error = ?capped(error), "ignoring a failure of a server that may fail");
            continue;
        }
        failures.push(Failure {
            message: format!("{}: {error}", entry.describe()),
            transient,
        });
    }

    if !failures.is_empty() {
        // Nothing changed on the servers that prepared: they keep what they ran.
        abort_all(context, snapshot, &prepared, reload_id).await;
        return (failures, syncs);
    }

    let commits = join_all(prepared.iter().map(|entry| async move {
        match (&entry.result, entry.loaded_vcl()) {
            (Ok(_), Some((link, vcl_name))) => (
                entry,
                commit(context, snapshot, entry, link, vcl_name, reload_id).await,
            ),
            // Already running this VCL (unchanged): in sync without a commit.
            (Ok(result), None) if result.ok => (entry, Ok(())),
            // Failed to prepare (a server that may fail): recorded above.
            _ => (entry, Err(None)),
        }
    }))
    .await;
    for (entry, committed) in commits {
        match committed {
            Ok(()) => syncs.push(ServerSync {
                server_id: entry.server.id,
                error: None,
            }),
            Err(None) => {}
            Err(Some(failure)) => {
                syncs.push(ServerSync {
                    server_id: entry.server.id,
                    error: Some(capped(failure.message.clone())),
                });
                if entry.server.status == ServerStatus::Maintenance as i32 {
                    warn!(server = entry.server.id, error = ?failure.message, "ignoring a commit failure of a maintenance server");
                } else {
                    failures.push(failure);
                }
            }
        }
    }
    (failures, syncs)
}

/// What one server runs after a reload: its version (no error) or why it failed.
struct ServerSync {
    server_id: i64,
    error: Option<String>,
}

/// Sends `server` the prepare command of `snapshot` (a snapshot without servers: the command
/// carries `server` alone) and follows it to its result.
async fn prepare(
    context: &ReloadContext,
    snapshot: &ClusterSnapshot,
    server: &VarnishServer,
    reload_id: &str,
) -> Prepared {
    let key = AgentKey {
        address: server.address.clone(),
        admin_port: server.admin_port.unwrap_or_default(),
    };
    let mut progress = progress::initial(server.id, &server.address);
    note(context, snapshot, &progress);
    let link = match context
        .agents
        .agent(&key, context.timeouts.agent_wait)
        .await
    {
        Ok(link) => link,
        Err(error) => {
            progress.phase = ServerPhase::Failed as i32;
            progress.error = error.to_string();
            note(context, snapshot, &progress);
            return Prepared {
                server: server.clone(),
                link: None,
                result: Err(error.to_string()),
                progress,
            };
        }
    };
    progress.phase = ServerPhase::Rendering as i32;
    note(context, snapshot, &progress);
    let command = AttachResponse {
        term: context.term_number,
        command: Some(Command::Prepare(PrepareCommand {
            reload_id: reload_id.to_owned(),
            server_id: server.id,
            snapshot: Some(ClusterSnapshot {
                servers: vec![server.clone()],
                ..snapshot.clone()
            }),
        })),
    };
    let answer = link
        .call_observing(
            command,
            context.timeouts.prepare,
            |message| {
                matches!(message, AgentMessage::PrepareResult(result) if result.reload_id == reload_id)
            },
            |message| {
                if let AgentMessage::PrepareProgress(update) = message
                    && update.reload_id == reload_id
                {
                    progress.phase = ServerPhase::Compiling as i32;
                    progress.render_duration = update.render_duration;
                    note(context, snapshot, &progress);
                }
            },
        )
        .await;
    let result = match answer {
        Ok(AgentMessage::PrepareResult(result)) => Ok(result),
        Ok(_) => Err("unexpected answer to prepare".to_owned()),
        Err(error) => Err(error.to_string()),
    };
    match &result {
        Ok(result) => {
            progress.render_duration = result.render_duration;
            progress.unchanged = result.unchanged;
            if !result.unchanged {
                progress.compile_duration = result.load_duration;
            }
            progress.phase = match (result.ok, result.unchanged) {
                (true, true) => ServerPhase::Active,
                (true, false) => ServerPhase::Loaded,
                (false, _) => ServerPhase::Failed,
            } as i32;
            progress.error = result.error.clone();
        }
        Err(error) => {
            progress.phase = ServerPhase::Failed as i32;
            progress.error = error.clone();
        }
    }
    note(context, snapshot, &progress);
    Prepared {
        server: server.clone(),
        link: Some(link),
        result,
        progress,
    }
}

/// Notes a server's phase in this reload for watchers.
fn note(context: &ReloadContext, snapshot: &ClusterSnapshot, progress: &ServerReloadProgress) {
    let cluster_id = snapshot.cluster.as_ref().map_or(0, |cluster| cluster.id);
    context
        .progress
        .record(cluster_id, snapshot.version, progress);
}

/// Activates a prepared VCL; returns the failure, if any (`Err(Some(..))`).
async fn commit(
    context: &ReloadContext,
    snapshot: &ClusterSnapshot,
    entry: &Prepared,
    link: &Arc<AgentLink>,
    vcl_name: &str,
    reload_id: &str,
) -> Result<(), Option<Failure>> {
    let command = AttachResponse {
        term: context.term_number,
        command: Some(Command::Commit(CommitCommand {
            reload_id: reload_id.to_owned(),
            vcl_name: vcl_name.to_owned(),
        })),
    };
    let answer = link
        .call(command, context.timeouts.commit, |message| {
            matches!(message, AgentMessage::CommitResult(result) if result.reload_id == reload_id)
        })
        .await;
    let mut progress = entry.progress.clone();
    let error = match answer {
        Ok(AgentMessage::CommitResult(result)) if result.ok => {
            progress.phase = ServerPhase::Active as i32;
            progress.activate_duration = result.use_duration;
            note(context, snapshot, &progress);
            let hello = link.hello();
            if let Err(error) = context
                .store
                .record_agent_report(
                    &hello.address,
                    hello.admin_port,
                    &result.active_vcl_version,
                    &vaas_store::VarnishSettings {
                        unsafe_settings: &hello.unsafe_settings,
                        cc_command: &hello.cc_command,
                    },
                )
                .await
            {
                warn!(server = entry.server.id, %error, "cannot record the running vcl version");
            }
            return Ok(());
        }
        Ok(AgentMessage::CommitResult(result)) => (result.error, result.transient),
        Ok(_) => ("unexpected answer to commit".to_owned(), true),
        Err(error) => (error.to_string(), true),
    };
    let (error, transient) = error;
    progress.phase = ServerPhase::Failed as i32;
    progress.error = capped(error.clone());
    note(context, snapshot, &progress);
    Err(Some(Failure {
        message: format!(
            "{}: activating {vcl_name} failed: {error}",
            entry.describe()
        ),
        transient,
    }))
}

/// Discards what the prepare phase loaded, so nothing half-applied stays behind.
async fn abort_all(
    context: &ReloadContext,
    snapshot: &ClusterSnapshot,
    prepared: &[Prepared],
    reload_id: &str,
) {
    join_all(prepared.iter().filter_map(|entry| {
        let (link, vcl_name) = entry.loaded_vcl()?;
        let command = AttachResponse {
            term: context.term_number,
            command: Some(Command::Abort(AbortCommand {
                reload_id: reload_id.to_owned(),
                vcl_name: vcl_name.to_owned(),
            })),
        };
        Some(async move {
            let answer = link
                .call(command, context.timeouts.commit, |message| {
                    matches!(message, AgentMessage::AbortResult(result) if result.reload_id == reload_id)
                })
                .await;
            if let Err(error) = answer {
                warn!(server = entry.server.id, %error, "abort failed; the agent's VCL cleanup will discard it");
            }
            let mut progress = entry.progress.clone();
            progress.phase = ServerPhase::Discarded as i32;
            note(context, snapshot, &progress);
        })
    }))
    .await;
}

/// Cuts an error that came from agents (a compiler's message can be hundreds of KiB) to what a
/// task keeps, before it is logged or stored.
fn capped(error: String) -> String {
    if error.chars().count() <= vaas_store::TASK_ERROR_MAX_CHARS {
        return error;
    }
    error
        .chars()
        .take(vaas_store::TASK_ERROR_MAX_CHARS)
        .collect()
}
