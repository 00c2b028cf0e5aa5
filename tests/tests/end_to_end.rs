//! End-to-end: a change made through the gRPC API is served by a real varnishd, synchronously
//! and asynchronously, on SQLite and on PostgreSQL; compile errors and bad input are reported
//! and lose nothing.

use anyhow::{Context, Result, ensure};
use tonic::Code;
use tonic_types::StatusExt;
use vaas_proto::v1::{
    Backend, CreateBackendRequest, CreateDirectorRequest, CreateVarnishServerRequest, Director,
    ListBackendsRequest, ListTasksRequest, SyncState, TaskState, UpdateVclTemplateRequest,
    VarnishServer, VclTemplate,
};
use vaas_testkit::{HttpOrigin, http_get};
use vaas_tests::{StoreKind, System, backend_for, on_both_stores};

on_both_stores!(
    synchronous_write_answers_after_varnish_serves_the_backend,
    asynchronous_write_answers_at_once_and_the_watch_follows_the_task,
    compile_error_fails_the_task_and_the_old_vcl_keeps_serving,
    invalid_input_is_refused_and_saves_nothing,
);

async fn assert_served_by(system: &System, origin: &HttpOrigin) -> Result<()> {
    let response = http_get(system.varnishd(0).http_addr(), "/hello", "demo.example").await?;
    ensure!(
        response.status == 200 && response.header("x-origin") == Some(origin.name()),
        "varnish should answer from {}: {} {:?}",
        origin.name(),
        response.status,
        response.headers
    );
    Ok(())
}

async fn synchronous_write_answers_after_varnish_serves_the_backend(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let before = http_get(system.varnishd(0).http_addr(), "/hello", "demo.example").await?;
    assert_eq!(
        before.status, 404,
        "a director without backends answers 404"
    );

    let origin = HttpOrigin::start("origin-a").await?;
    let created = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?
        .into_inner();
    assert_eq!(created.tasks.len(), 1);
    assert_eq!(
        created.tasks[0].state,
        TaskState::Success as i32,
        "{:?}",
        created.tasks[0]
    );
    // No waiting: the synchronous answer means the VCL is active.
    assert_served_by(&system, &origin).await?;

    let cluster = system.cluster(setup.cluster_id).await?;
    assert_eq!(cluster.reload_timestamp, created.tasks[0].timestamp);
    assert!(cluster.last_error.is_empty());
    let server = system.server(setup.server_id).await?;
    let served_version = http_get(system.varnishd(0).http_addr(), "/vaas_version", "x").await?;
    assert_eq!(
        server.running_vcl_version,
        served_version.body.trim(),
        "VaaS knows what runs"
    );
    system.ensure_running()
}

async fn asynchronous_write_answers_at_once_and_the_watch_follows_the_task(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-async").await?;

    let request = vaas_tests::respond_async(CreateBackendRequest {
        backend: Some(backend_for(&setup, origin.addr())),
    });
    let response = system.config().create_backend(request).await?;
    let location = response
        .metadata()
        .get("location")
        .context("an async answer says where the task is")?
        .to_str()?
        .to_owned();
    let created = response.into_inner();
    assert_eq!(created.tasks.len(), 1);
    let task = &created.tasks[0];
    assert_eq!(task.state, TaskState::Pending as i32);
    assert_eq!(location, format!("tasks/{}", task.id));

    let mut states: Vec<i32> = system
        .watch(task.id)
        .await?
        .iter()
        .map(|update| update.state)
        .collect();
    // The watch also sends an update when a server's phase changes, in the same state.
    states.dedup();
    // The write answered before the reload (compiling takes far longer than answering), so the
    // watch starts before the end and walks forward to SUCCESS, never backwards.
    let expected = [
        TaskState::Pending as i32,
        TaskState::Started as i32,
        TaskState::Success as i32,
    ];
    assert!(
        states.len() >= 2,
        "the watch saw the task unfinished first: {states:?}"
    );
    assert!(
        states.windows(2).all(|pair| pair[0] < pair[1]),
        "{states:?}"
    );
    assert!(
        states.iter().all(|state| expected.contains(state)),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&(TaskState::Success as i32)));
    assert_served_by(&system, &origin).await?;

    let finished = system.task(task.id).await?;
    assert!(finished.start_time.is_some() && finished.finish_time.is_some());
    system.ensure_running()
}

async fn compile_error_fails_the_task_and_the_old_vcl_keeps_serving(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-steady").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;
    assert_served_by(&system, &origin).await?;
    let server = system.server(setup.server_id).await?;
    assert_eq!(server.sync_state, SyncState::Synced as i32, "{server:?}");
    assert_eq!(
        server.synced_timestamp,
        system.cluster(setup.cluster_id).await?.reload_timestamp,
        "the server runs the cluster's newest change"
    );

    let broken = VclTemplate {
        id: setup.template_id,
        name: "default".into(),
        content: "<VCL/>\nsub vcl_deliver { set resp.http.x-broken = ; }\n".into(),
        ..Default::default()
    };
    let status = system
        .config()
        .update_vcl_template(UpdateVclTemplateRequest {
            vcl_template: Some(broken),
            update_mask: None,
        })
        .await
        .expect_err("a template that does not compile fails the synchronous write");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().context("error info")?;
    assert_eq!(info.reason, "RELOAD_FAILED");
    assert_eq!(info.metadata.get("saved").map(String::as_str), Some("true"));
    let task_id: i64 = info.metadata.get("task_ids").context("task ids")?.parse()?;

    let task = system.task(task_id).await?;
    assert_eq!(task.state, TaskState::Failure as i32);
    assert!(
        task.error.contains("x-broken"),
        "the compiler's message: {}",
        task.error
    );
    let cluster = system.cluster(setup.cluster_id).await?;
    assert!(
        cluster.last_error.contains("x-broken"),
        "{}",
        cluster.last_error
    );
    assert_eq!(cluster.error_timestamp, task.timestamp);
    assert_ne!(cluster.reload_timestamp, task.timestamp);
    assert_served_by(&system, &origin).await?;
    let failed_server = system.server(setup.server_id).await?;
    assert_eq!(failed_server.sync_state, SyncState::Error as i32);
    assert!(
        failed_server.sync_error.contains("x-broken"),
        "{}",
        failed_server.sync_error
    );
    assert_eq!(
        failed_server.synced_timestamp, server.synced_timestamp,
        "it still runs the configuration before the failed change"
    );

    let failed = system
        .tasks()
        .list_tasks(ListTasksRequest {
            cluster_id: setup.cluster_id,
            state: TaskState::Failure as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(failed.tasks.len(), 1);
    system.ensure_running()
}

async fn invalid_input_is_refused_and_saves_nothing(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let mut config = system.config();
    let tasks_before = system
        .tasks()
        .list_tasks(ListTasksRequest::default())
        .await?
        .into_inner();

    let malformed = Backend {
        address: "10.0.0.999".into(),
        ..backend_for(&setup, "127.0.0.1:80".parse()?)
    };
    let status = config
        .create_backend(CreateBackendRequest {
            backend: Some(malformed),
        })
        .await
        .expect_err("a malformed address is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let violations = status
        .get_details_bad_request()
        .context("field violations")?;
    assert_eq!(violations.field_violations[0].field, "backend.address");

    let unknown_cluster = VarnishServer {
        address: "10.0.0.7".into(),
        dc_id: setup.dc_id,
        template_id: setup.template_id,
        cluster_id: 4242,
        ..Default::default()
    };
    let status = config
        .create_varnish_server(CreateVarnishServerRequest {
            varnish_server: Some(unknown_cluster),
        })
        .await
        .expect_err("an unknown cluster is refused");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("varnish_server.cluster_id"),
        "{}",
        status.message()
    );

    let duplicate = Director {
        name: "demo".into(),
        cluster_ids: vec![setup.cluster_id],
        route_expression: "^/other".into(),
        ..Default::default()
    };
    let status = config
        .create_director(CreateDirectorRequest {
            director: Some(duplicate),
        })
        .await
        .expect_err("a duplicate name is refused");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains("director.name"),
        "{}",
        status.message()
    );

    let backends = config
        .list_backends(ListBackendsRequest::default())
        .await?
        .into_inner();
    assert!(backends.backends.is_empty(), "nothing was saved");
    let tasks_after = system
        .tasks()
        .list_tasks(ListTasksRequest::default())
        .await?
        .into_inner();
    assert_eq!(tasks_before.tasks, tasks_after.tasks, "no task was created");
    system.ensure_running()
}
