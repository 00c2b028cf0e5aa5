//! Reload semantics seen from outside: all-or-nothing across a cluster's active servers,
//! maintenance servers that may fail, bursts coalesced into few reloads, and a scheduler restart
//! that leaves no task behind.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tonic::Code;
use tonic_types::StatusExt;
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli};
use vaas_proto::v1::{
    CreateBackendRequest, CreateVarnishServerRequest, ServerStatus, SyncState, Task, TaskState,
    UpdateVarnishServerRequest, UpdateVclTemplateRequest, VclTemplate,
};
use vaas_testkit::{HttpOrigin, http_get};
use vaas_tests::{StoreKind, System, backend_for, on_both_stores, silent_server};

on_both_stores!(
    a_failing_active_server_stops_the_whole_cluster_but_a_maintenance_one_does_not,
    a_burst_of_changes_is_applied_by_a_few_reloads,
    tasks_saved_while_the_scheduler_is_down_finish_after_it_restarts,
    a_varnishd_that_lost_its_vcl_gets_it_back_when_its_agent_attaches,
    a_standby_scheduler_takes_over_when_the_leader_stops,
    a_change_made_while_the_agent_is_away_is_retried_until_it_is_back,
);

/// Follows a task until it ends and returns it as it ended.
async fn watch_to_end(system: &System, task_id: i64) -> Result<Task> {
    system
        .watch(task_id)
        .await?
        .pop()
        .context("the watch sent nothing")
}

async fn generation_header(system: &System) -> Result<Option<String>> {
    let response = http_get(system.varnishd(0).http_addr(), "/", "demo.example").await?;
    ensure!(response.status == 200, "served: {}", response.status);
    Ok(response.header("x-generation").map(str::to_owned))
}

async fn a_failing_active_server_stops_the_whole_cluster_but_a_maintenance_one_does_not(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;
    assert_eq!(generation_header(&system).await?, None);

    // A second active server whose agent never attaches: every reload of the cluster fails.
    let silent = silent_server(&setup);
    let status = system
        .config()
        .create_varnish_server(CreateVarnishServerRequest {
            varnish_server: Some(silent),
        })
        .await
        .expect_err("a reload with an unreachable active server fails");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("no agent is attached"),
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().context("error info")?;
    let silent_id: i64 = info
        .metadata
        .get("resource")
        .and_then(|resource| resource.strip_prefix("varnish_servers/"))
        .context("the saved server is named")?
        .parse()?;

    let next_generation = VclTemplate {
        id: setup.template_id,
        name: "default".into(),
        content: "<VCL/>\nsub vcl_deliver { set resp.http.x-generation = \"2\"; }\n".into(),
        ..Default::default()
    };
    let status = system
        .config()
        .update_vcl_template(UpdateVclTemplateRequest {
            vcl_template: Some(next_generation),
            update_mask: None,
        })
        .await
        .expect_err("still failing while the silent server is active");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        generation_header(&system).await?,
        None,
        "all or nothing: the reachable server did not activate the new VCL either"
    );

    // In maintenance, the silent server's failure no longer counts.
    let mut maintenance = system.server(silent_id).await?;
    maintenance.status = ServerStatus::Maintenance as i32;
    let updated = system
        .config()
        .update_varnish_server(UpdateVarnishServerRequest {
            varnish_server: Some(maintenance),
            update_mask: None,
        })
        .await?
        .into_inner();
    assert!(
        updated
            .tasks
            .iter()
            .all(|task| task.state == TaskState::Success as i32)
    );
    assert_eq!(generation_header(&system).await?.as_deref(), Some("2"));
    system.ensure_running()
}

async fn a_burst_of_changes_is_applied_by_a_few_reloads(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin").await?;
    let reloads_before = system.succeeded_reloads();
    let mut task_ids = Vec::new();
    for index in 1..=10u8 {
        let mut backend = backend_for(&setup, origin.addr());
        backend.address = format!("127.0.0.{index}");
        let request = vaas_tests::respond_async(CreateBackendRequest {
            backend: Some(backend),
        });
        let created = system.config().create_backend(request).await?.into_inner();
        task_ids.extend(created.tasks.iter().map(|task| task.id));
    }
    assert_eq!(task_ids.len(), 10);
    let last = watch_to_end(&system, *task_ids.last().context("tasks")?).await?;
    assert_eq!(last.state, TaskState::Success as i32);
    for &task_id in &task_ids {
        let task = watch_to_end(&system, task_id).await?;
        assert_eq!(
            task.state,
            TaskState::Success as i32,
            "every task of the burst: {task:?}"
        );
    }
    let reloads = system.succeeded_reloads() - reloads_before;
    assert!(
        (1..10).contains(&reloads),
        "10 writes made {reloads} reloads; only the newest intent should trigger one"
    );
    system.ensure_running()
}

async fn tasks_saved_while_the_scheduler_is_down_finish_after_it_restarts(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-after-restart").await?;
    system.stop_scheduler(0);

    let request = vaas_tests::respond_async(CreateBackendRequest {
        backend: Some(backend_for(&setup, origin.addr())),
    });
    let created = system.config().create_backend(request).await?.into_inner();
    let task_id = created.tasks.first().context("a task")?.id;
    let still_pending = system.task(task_id).await?;
    assert_eq!(
        still_pending.state,
        TaskState::Pending as i32,
        "nobody applies it yet"
    );

    system.restart_scheduler(0).await?;
    let task = watch_to_end(&system, task_id).await?;
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    let response = http_get(system.varnishd(0).http_addr(), "/", "demo.example").await?;
    assert_eq!(response.header("x-origin"), Some(origin.name()));
    system.ensure_running()
}

async fn a_varnishd_that_lost_its_vcl_gets_it_back_when_its_agent_attaches(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-resync").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;

    // While the agent is away, varnishd ends up running something else (as after a restart
    // with another VCL, or an operator's hand).
    system.stop_agent(0);
    let varnishd = system.varnishd(0);
    let secret = std::fs::read(varnishd.secret_file())?;
    let mut cli =
        VarnishCli::connect(varnishd.admin_addr(), &secret, CliTimeouts::default()).await?;
    cli.vcl_inline(
        "intruder",
        "vcl 4.1;\nbackend none_here none;\nsub vcl_recv { return (synth(418)); }\n",
    )
    .await?;
    cli.vcl_use("intruder").await?;
    let hijacked = http_get(varnishd.http_addr(), "/", "demo.example").await?;
    assert_eq!(hijacked.status, 418);

    // No change is pending, yet attaching makes the scheduler put the cluster's VCL back.
    system.restart_agent(0).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = http_get(system.varnishd(0).http_addr(), "/", "demo.example").await?;
        if response.header("x-origin") == Some(origin.name()) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "varnishd still answers {} after its agent re-attached",
            response.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.ensure_running()
}

/// An agent that is away is a transient failure: the change's task waits in RETRY (with the
/// reason) instead of failing, and finishes by itself once the agent is back, with no further
/// write.
async fn a_change_made_while_the_agent_is_away_is_retried_until_it_is_back(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    system.stop_agent(0);
    let origin = HttpOrigin::start("origin-retried").await?;
    let request = vaas_tests::respond_async(CreateBackendRequest {
        backend: Some(backend_for(&setup, origin.addr())),
    });
    let task_id = system
        .config()
        .create_backend(request)
        .await?
        .into_inner()
        .tasks[0]
        .id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let retrying = loop {
        let task = system.task(task_id).await?;
        if task.state == TaskState::Retry as i32 {
            break task;
        }
        ensure!(
            task.state != TaskState::Failure as i32,
            "a missing agent failed the task at once: {task:?}"
        );
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the task never went to RETRY: {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the task
    };
    assert!(
        retrying.error.contains("no agent is attached"),
        "{}",
        retrying.error
    );
    let away = system.server(setup.server_id).await?;
    assert_eq!(away.sync_state, SyncState::Disconnected as i32, "{away:?}");

    system.restart_agent(0).await?;
    let ended = watch_to_end(&system, task_id).await?;
    assert_eq!(ended.state, TaskState::Success as i32, "{ended:?}");
    let back = system.server(setup.server_id).await?;
    assert_eq!(back.sync_state, SyncState::Synced as i32, "{back:?}");
    assert_eq!(back.synced_timestamp, ended.timestamp);
    let page = http_get(system.varnishd(0).http_addr(), "/", "demo.example").await?;
    assert_eq!(page.header("x-origin"), Some(origin.name()));
    system.ensure_running()
}

async fn a_standby_scheduler_takes_over_when_the_leader_stops(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).schedulers(2).start().await?;
    let setup = system.set_up().await?;
    let first = HttpOrigin::start("origin-before-failover").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, first.addr())),
        })
        .await?;
    let log = system.scheduler_log();
    assert_eq!(
        log.matches("leading: this replica drives reloads").count(),
        1,
        "one leader"
    );

    system.stop_scheduler(0);
    system.wait_until_leading(1).await?;
    // A synchronous write goes through the new leader once the agent found it.
    let second = HttpOrigin::start("origin-after-failover").await?;
    let created = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, second.addr())),
        })
        .await?
        .into_inner();
    assert!(
        created
            .tasks
            .iter()
            .all(|task| task.state == TaskState::Success as i32)
    );
    let mut origins_seen = std::collections::BTreeSet::new();
    for request in 0..4 {
        // Distinct URLs: a cached answer would not show which backend serves.
        let path = format!("/after-failover/{request}");
        let response = http_get(system.varnishd(0).http_addr(), &path, "demo.example").await?;
        origins_seen.insert(response.header("x-origin").unwrap_or_default().to_owned());
    }
    assert!(
        origins_seen.contains(second.name()),
        "served after failover: {origins_seen:?}"
    );
    system.ensure_running()
}
