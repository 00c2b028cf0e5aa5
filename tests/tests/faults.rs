//! The fault suite: a component crashes (kill -9), freezes (SIGSTOP) or loses its data during a
//! burst of asynchronous writes, and afterwards, **without any further write**:
//!
//! - every acknowledged write is in the store,
//! - every task of the cluster is terminal, and none failed (each fault here ends well within
//!   what the scheduler's retries and the standby's take-over absorb),
//! - varnishd runs the VCL of the final state: the backends of its active VCL (read from
//!   varnishd itself with `vcl.show`) are exactly the backends in the store,
//! - and VaaS reports the server SYNCED,
//!
//! all within [`CONVERGENCE_BOUND`] of the end of the burst. Each case runs on both stores.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::sync::watch;
use tokio::time::Instant;
use vaas_proto::v1::{
    Backend, CreateBackendRequest, ListBackendsRequest, ListTasksRequest, SyncState, Task,
    TaskState,
};
use vaas_tests::{Setup, StoreKind, System, backend_for, on_both_stores, respond_async};

on_both_stores!(
    the_api_killed_during_a_burst_loses_no_acknowledged_write_and_the_cluster_converges,
    the_scheduler_leader_killed_during_a_burst_fails_no_task_and_the_standby_converges,
    the_scheduler_leader_frozen_during_a_burst_fails_no_task_and_the_standby_converges,
    an_agent_killed_during_a_burst_comes_back_and_its_server_converges,
    nats_killed_during_a_burst_delays_reloads_but_the_cluster_converges,
    nats_killed_and_wiped_during_a_burst_heals_and_the_cluster_converges,
    varnishd_killed_during_a_burst_is_repaired_and_converges,
    varnishd_frozen_during_a_compile_finishes_the_reload_without_a_failure,
);

/// Writes in one burst: each creates a backend with a port of its own.
const BURST_WRITES: u16 = 200;

/// Writes acknowledged before the fault is injected.
const FAULT_AFTER_ACKNOWLEDGED: usize = 60;

/// The first backend port of a burst (nothing listens there: the VCL is what is checked).
const FIRST_PORT: u16 = 20_000;

/// How long after the end of the burst the cluster may take to converge.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(45);

/// What a burst got acknowledged, by backend port.
#[derive(Debug, Default)]
struct BurstOutcome {
    acknowledged: BTreeMap<u16, i64>,
    refused: usize,
}

/// A burst of asynchronous writes running in the background, with a count of acknowledged ones.
struct Burst {
    acknowledged: watch::Receiver<usize>,
    writers: tokio::task::JoinHandle<Result<BurstOutcome>>,
}

impl Burst {
    /// Starts [`BURST_WRITES`] asynchronous backend creations, two at a time, each writer
    /// pausing 10 ms between its writes (about 150 writes per second), so that a fault injected
    /// after [`FAULT_AFTER_ACKNOWLEDGED`] lands in the middle of it. A failed write counts as
    /// refused and the burst goes on 100 ms later.
    fn start(system: &System, setup: &Setup) -> Burst {
        let (progress, acknowledged) = watch::channel(0);
        let progress = Arc::new(progress);
        let next = Arc::new(AtomicU16::new(0));
        let mut writers = Vec::new();
        for _ in 0..2 {
            let mut config = system.config();
            let template = backend_for(setup, "127.0.0.1:1".parse().expect("an address"));
            let next = next.clone();
            let progress = progress.clone();
            writers.push(tokio::spawn(async move {
                let mut outcome = BurstOutcome::default();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= BURST_WRITES {
                        return outcome;
                    }
                    let port = FIRST_PORT + index;
                    let request = respond_async(CreateBackendRequest {
                        backend: Some(Backend {
                            port: Some(u32::from(port)),
                            ..template.clone()
                        }),
                    });
                    let answer = tokio::time::timeout(
                        Duration::from_secs(10),
                        config.create_backend(request),
                    )
                    .await;
                    match answer {
                        Ok(Ok(response)) => {
                            let id = response
                                .into_inner()
                                .backend
                                .map_or(0, |backend| backend.id);
                            outcome.acknowledged.insert(port, id);
                            progress.send_modify(|count| *count += 1);
                        }
                        Ok(Err(_)) | Err(_) => {
                            outcome.refused += 1;
                            // The API may be down: give it time to come back within the burst.
                            tokio::time::sleep(Duration::from_millis(90)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        let writers = tokio::spawn(async move {
            let mut total = BurstOutcome::default();
            for writer in writers {
                let outcome = writer.await?;
                total.acknowledged.extend(outcome.acknowledged);
                total.refused += outcome.refused;
            }
            Ok(total)
        });
        Burst {
            acknowledged,
            writers,
        }
    }

    /// Waits until `count` writes were acknowledged (the fault's moment).
    async fn wait_acknowledged(&mut self, count: usize) -> Result<()> {
        tokio::time::timeout(
            Duration::from_secs(60),
            self.acknowledged
                .wait_for(|acknowledged| *acknowledged >= count),
        )
        .await
        .context("the burst stalled before the fault")??;
        Ok(())
    }

    /// Waits until every write was sent and answered (or failed).
    async fn finish(self) -> Result<BurstOutcome> {
        tokio::time::timeout(Duration::from_secs(120), self.writers)
            .await
            .context("the burst did not finish")??
    }
}

/// Lists every backend of the set-up director in the store, by port.
async fn stored_backends(system: &System, setup: &Setup) -> Result<BTreeMap<u16, i64>> {
    let mut stored = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = system
            .config()
            .list_backends(ListBackendsRequest {
                page_size: 1000,
                page_token,
                director_id: setup.director_id,
                ..Default::default()
            })
            .await?
            .into_inner();
        for backend in page.backends {
            stored.insert(u16::try_from(backend.port.unwrap_or_default())?, backend.id);
        }
        if page.next_page_token.is_empty() {
            return Ok(stored);
        }
        page_token = page.next_page_token;
    }
}

/// Lists every task of the cluster.
async fn cluster_tasks(system: &System, cluster_id: i64) -> Result<Vec<Task>> {
    let mut tasks = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = system
            .tasks()
            .list_tasks(ListTasksRequest {
                page_size: 1000,
                page_token,
                cluster_id,
                ..Default::default()
            })
            .await?
            .into_inner();
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() {
            return Ok(tasks);
        }
        page_token = page.next_page_token;
    }
}

fn is_terminal(task: &Task) -> bool {
    [TaskState::Success, TaskState::Failure, TaskState::Revoked]
        .iter()
        .any(|state| *state as i32 == task.state)
}

/// Returns the backend ports of the VCL varnishd `index` has active, asking varnishd itself.
async fn active_vcl_ports(system: &System, index: usize) -> Result<Vec<u16>> {
    let list = system.varnishd(index).varnishadm(&["vcl.list"]).await?;
    let active = list
        .lines()
        .find(|line| line.starts_with("active"))
        .and_then(|line| line.split_whitespace().last())
        .with_context(|| format!("no active VCL in {list}"))?
        .to_owned();
    let text = system
        .varnishd(index)
        .varnishadm(&["vcl.show", &active])
        .await?;
    let mut ports: Vec<u16> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix(".port = \""))
        .filter_map(|rest| rest.strip_suffix("\";"))
        .filter_map(|port| port.parse().ok())
        .filter(|port| *port >= FIRST_PORT)
        .collect();
    ports.sort_unstable();
    Ok(ports)
}

/// Polls `check` every 200 ms until it succeeds or `deadline` passes; then fails with its last
/// error.
async fn eventually<T, F, Fut>(deadline: Instant, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Checks every promise of the suite after a burst (see the module's documentation) and prints
/// how long convergence took.
async fn assert_converged(
    system: &mut System,
    setup: &Setup,
    outcome: &BurstOutcome,
    case: &str,
) -> Result<()> {
    let burst_ended = Instant::now();
    let deadline = burst_ended + CONVERGENCE_BOUND;
    // The API may itself be coming back; reads are retried until the deadline.
    let stored = eventually(deadline, || stored_backends(system, setup)).await?;
    for (port, id) in &outcome.acknowledged {
        ensure!(
            stored.get(port) == Some(id),
            "{case}: acknowledged backend {id} (port {port}) is not in the store"
        );
    }
    let tasks = eventually(deadline, || async {
        let tasks = cluster_tasks(system, setup.cluster_id).await?;
        let unfinished: Vec<_> = tasks.iter().filter(|task| !is_terminal(task)).collect();
        ensure!(unfinished.is_empty(), "tasks not terminal: {unfinished:?}");
        Ok(tasks)
    })
    .await?;
    let failed: Vec<_> = tasks
        .iter()
        .filter(|task| task.state == TaskState::Failure as i32)
        .map(|task| (task.id, task.error.clone()))
        .collect();
    ensure!(failed.is_empty(), "{case}: tasks failed: {failed:?}");
    let tasks_done = burst_ended.elapsed();
    let expected: Vec<u16> = stored.keys().copied().collect();
    eventually(deadline, || async {
        let active = active_vcl_ports(system, 0).await?;
        ensure!(
            active == expected,
            "varnishd's active VCL has {} backends, the store {}",
            active.len(),
            expected.len()
        );
        Ok(())
    })
    .await?;
    let vcl_done = burst_ended.elapsed();
    eventually(deadline, || async {
        let server = system.server(setup.server_id).await?;
        ensure!(
            server.sync_state == SyncState::Synced as i32,
            "the server is {:?}: {}",
            server.sync_state(),
            server.sync_error
        );
        Ok(())
    })
    .await?;
    eprintln!(
        "{case}: {} acknowledged, {} refused, {} stored, {} tasks; after the burst: tasks \
         terminal in {tasks_done:?}, varnishd on the final VCL in {vcl_done:?}, SYNCED in {:?}",
        outcome.acknowledged.len(),
        outcome.refused,
        stored.len(),
        tasks.len(),
        burst_ended.elapsed()
    );
    system.ensure_running()
}

async fn the_api_killed_during_a_burst_loses_no_acknowledged_write_and_the_cluster_converges(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let mut burst = Burst::start(&system, &setup);
    burst.wait_acknowledged(FAULT_AFTER_ACKNOWLEDGED).await?;
    system.kill_api();
    tokio::time::sleep(Duration::from_secs(1)).await;
    system.restart_api().await?;
    let outcome = burst.finish().await?;
    ensure!(outcome.refused > 0, "writes during the outage were refused");
    ensure!(
        outcome.acknowledged.len() > FAULT_AFTER_ACKNOWLEDGED + 20,
        "writes after the restart were acknowledged: {outcome:?}"
    );
    assert_converged(&mut system, &setup, &outcome, "api killed").await
}

async fn the_scheduler_leader_killed_during_a_burst_fails_no_task_and_the_standby_converges(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).schedulers(2).start().await?;
    let setup = system.set_up().await?;
    let mut burst = Burst::start(&system, &setup);
    burst.wait_acknowledged(FAULT_AFTER_ACKNOWLEDGED).await?;
    system.kill_scheduler(0);
    let outcome = burst.finish().await?;
    system.wait_until_leading(1).await?;
    assert_converged(&mut system, &setup, &outcome, "leader killed").await
}

async fn the_scheduler_leader_frozen_during_a_burst_fails_no_task_and_the_standby_converges(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).schedulers(2).start().await?;
    let setup = system.set_up().await?;
    let mut burst = Burst::start(&system, &setup);
    burst.wait_acknowledged(FAULT_AFTER_ACKNOWLEDGED).await?;
    // Frozen for twice the harness's 3 s lease: the standby takes over meanwhile, and the old
    // leader wakes up believing it still leads until it tries to renew.
    system.pause_scheduler(0);
    system.wait_until_leading(1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    system.resume_scheduler(0);
    let outcome = burst.finish().await?;
    assert_converged(&mut system, &setup, &outcome, "leader frozen").await?;
    ensure!(
        system.leader().await == Some(1),
        "the replica that took over still leads"
    );
    Ok(())
}

async fn an_agent_killed_during_a_burst_comes_back_and_its_server_converges(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let mut burst = Burst::start(&system, &setup);
    burst.wait_acknowledged(FAULT_AFTER_ACKNOWLEDGED).await?;
    system.kill_agent(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    system.restart_agent(0).await?;
    let outcome = burst.finish().await?;
    assert_converged(&mut system, &setup, &outcome, "agent killed").await
}

async fn nats_killed(store: StoreKind, wipe_data: bool, case: &str) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let mut burst = Burst::start(&system, &setup);
    burst.wait_acknowledged(FAULT_AFTER_ACKNOWLEDGED).await?;
    system.nats_mut().kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    system.nats_mut().start_again(wipe_data).await?;
    let outcome = burst.finish().await?;
    assert_converged(&mut system, &setup, &outcome, case).await
}

async fn nats_killed_during_a_burst_delays_reloads_but_the_cluster_converges(
    store: StoreKind,
) -> Result<()> {
    nats_killed(store, false, "nats killed").await
}

async fn nats_killed_and_wiped_during_a_burst_heals_and_the_cluster_converges(
    store: StoreKind,
) -> Result<()> {
    nats_killed(store, true, "nats killed, data lost").await
}

async fn varnishd_killed_during_a_burst_is_repaired_and_converges(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let mut burst = Burst::start(&system, &setup);
    burst.wait_acknowledged(FAULT_AFTER_ACKNOWLEDGED).await?;
    system.kill_varnishd(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Back empty, as after a crash: the agent restores its last good VCL, the scheduler the rest.
    system.restart_varnishd(0).await?;
    let outcome = burst.finish().await?;
    assert_converged(&mut system, &setup, &outcome, "varnishd killed").await
}

async fn varnishd_frozen_during_a_compile_finishes_the_reload_without_a_failure(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let burst = Burst::start(&system, &setup);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !system.varnishd(0).compiling() {
        if Instant::now() >= deadline {
            bail!("varnishd never compiled during the burst");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Longer than the agent's 10 s limit of short CLI commands: its checks of varnishd time out
    // while the compile (limited by --prepare-timeout) may go on.
    system.varnishd(0).pause();
    tokio::time::sleep(Duration::from_secs(12)).await;
    system.varnishd(0).resume();
    let outcome = burst.finish().await?;
    assert_converged(
        &mut system,
        &setup,
        &outcome,
        "varnishd frozen during a compile",
    )
    .await
}
