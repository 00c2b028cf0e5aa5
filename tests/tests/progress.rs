//! Per-server reload progress seen from outside: WatchTask shows each server rendering,
//! compiling and active with the time each step took, and WatchCluster shows a cluster's servers
//! and their phases in its newest reload, including a server that failed and one whose loaded
//! VCL was discarded because of it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::time::Instant;
use vaas_proto::v1::{
    CreateBackendRequest, CreateVarnishServerRequest, GetTaskRequest, ServerPhase,
    ServerReloadProgress, ServerStatus, SyncState, TaskState, UpdateVarnishServerRequest,
    WatchClusterRequest, WatchClusterResponse,
};
use vaas_testkit::HttpOrigin;
use vaas_tests::{StoreKind, System, backend_for, on_both_stores, respond_async, silent_server};

on_both_stores!(
    a_watched_task_shows_its_server_compiling_then_active_with_durations,
    a_watched_cluster_shows_a_failed_server_and_the_discarded_vcl_of_the_others,
);

fn phase(progress: &ServerReloadProgress) -> ServerPhase {
    ServerPhase::try_from(progress.phase).unwrap_or(ServerPhase::Unspecified)
}

fn micros(duration: Option<&prost_types::Duration>) -> i64 {
    duration.map_or(0, |duration| {
        duration.seconds * 1_000_000 + i64::from(duration.nanos / 1000)
    })
}

async fn a_watched_task_shows_its_server_compiling_then_active_with_durations(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin").await?;
    let created = system
        .config()
        .create_backend(respond_async(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        }))
        .await?
        .into_inner();
    let task_id = created.tasks.first().context("a task")?.id;

    let updates = system.watch(task_id).await?;
    let last = updates.last().context("the watch sent nothing")?;
    assert_eq!(last.state, TaskState::Success as i32, "{last:?}");
    let mut phases: Vec<ServerPhase> = updates
        .iter()
        .filter_map(|task| {
            task.servers
                .iter()
                .find(|server| server.varnish_server_id == setup.server_id)
        })
        .map(phase)
        .collect();
    phases.dedup();
    assert!(
        phases.contains(&ServerPhase::Compiling),
        "the compile (hundreds of ms) is seen while it runs: {phases:?}"
    );
    assert!(
        phases.windows(2).all(|pair| pair[0] < pair[1]),
        "phases only move forward: {phases:?}"
    );
    assert_eq!(phases.last(), Some(&ServerPhase::Active), "{phases:?}");

    let [server] = last.servers.as_slice() else {
        panic!("one server in the reload: {:?}", last.servers);
    };
    assert_eq!(server.address, "127.0.0.1");
    assert!(!server.unchanged && server.error.is_empty(), "{server:?}");
    let render = micros(server.render_duration.as_ref());
    let compile = micros(server.compile_duration.as_ref());
    let activate = micros(server.activate_duration.as_ref());
    assert!(
        server.render_duration.is_some() && compile > 0 && server.activate_duration.is_some(),
        "{server:?}"
    );
    eprintln!("render {render} us, compile {compile} us, activate {activate} us");

    let read = system
        .tasks()
        .get_task(GetTaskRequest { id: task_id })
        .await?
        .into_inner()
        .task
        .context("a task")?;
    assert_eq!(&read, last, "GetTask shows what the watch ended with");
    system.ensure_running()
}

/// Reads WatchCluster messages until one satisfies `done`, for at most 30 s.
async fn watch_cluster_until(
    watch: &mut tonic::Streaming<WatchClusterResponse>,
    what: &str,
    done: impl Fn(&WatchClusterResponse) -> bool,
) -> Result<WatchClusterResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        let Ok(message) = tokio::time::timeout_at(deadline, watch.message()).await else {
            anyhow::bail!("no message showed {what} within 30 s; the last: {last:#?}");
        };
        let message = message?.context("the cluster watch ended")?;
        if done(&message) {
            return Ok(message);
        }
        last = Some(message);
    }
}

fn reload_phase(message: &WatchClusterResponse, server_id: i64) -> Option<ServerPhase> {
    message
        .reload_servers
        .iter()
        .find(|server| server.varnish_server_id == server_id)
        .map(phase)
}

fn sync_state(message: &WatchClusterResponse, server_id: i64) -> Option<SyncState> {
    message
        .servers
        .iter()
        .find(|server| server.id == server_id)
        .and_then(|server| SyncState::try_from(server.sync_state).ok())
}

async fn a_watched_cluster_shows_a_failed_server_and_the_discarded_vcl_of_the_others(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let mut watch = system
        .status()
        .watch_cluster(WatchClusterRequest {
            cluster_id: setup.cluster_id,
        })
        .await?
        .into_inner();
    let first = watch.message().await?.context("a first message")?;
    assert_eq!(
        first.cluster.as_ref().map(|cluster| cluster.id),
        Some(setup.cluster_id)
    );
    assert_eq!(
        sync_state(&first, setup.server_id),
        Some(SyncState::Synced),
        "{first:#?}"
    );

    // An active server whose agent never attaches: the reachable server's new VCL is loaded,
    // then discarded, since a reload is all or nothing.
    let silent = silent_server(&setup);
    let created = system
        .config()
        .create_varnish_server(respond_async(CreateVarnishServerRequest {
            varnish_server: Some(silent),
        }))
        .await?
        .into_inner()
        .varnish_server
        .context("the server")?;
    // A change to the VCL of every server (adding a server changes no other server's VCL).
    let origin = HttpOrigin::start("origin").await?;
    system
        .config()
        .create_backend(respond_async(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        }))
        .await?;
    let failed = watch_cluster_until(&mut watch, "the silent server failed", |message| {
        reload_phase(message, created.id) == Some(ServerPhase::Failed)
            && reload_phase(message, setup.server_id) == Some(ServerPhase::Discarded)
    })
    .await?;
    let silent_progress = failed
        .reload_servers
        .iter()
        .find(|server| server.varnish_server_id == created.id)
        .context("the silent server's progress")?;
    assert!(
        silent_progress.error.contains("no agent is attached"),
        "{silent_progress:?}"
    );
    assert_eq!(
        sync_state(&failed, created.id),
        Some(SyncState::Disconnected)
    );
    ensure!(failed.reload_timestamp.is_some(), "{failed:#?}");

    // In maintenance the silent server's failure no longer counts: the other server activates.
    let mut maintenance = created.clone();
    maintenance.status = ServerStatus::Maintenance as i32;
    system
        .config()
        .update_varnish_server(UpdateVarnishServerRequest {
            varnish_server: Some(maintenance),
            update_mask: None,
        })
        .await?;
    watch_cluster_until(
        &mut watch,
        "the reachable server active and synced",
        |message| {
            reload_phase(message, setup.server_id) == Some(ServerPhase::Active)
                && sync_state(message, setup.server_id) == Some(SyncState::Synced)
        },
    )
    .await?;
    system.ensure_running()
}
