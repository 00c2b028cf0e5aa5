//! End-to-end: the configuration model through the gRPC API against a real varnishd — partial
//! updates, the rules that keep a cluster reloadable, probes and time profiles as Varnish serves
//! them.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use prost::Message;
use tokio::time::Instant;
use tonic::Code;
use vaas_proto::v1::{
    AuditAction, Backend, Cluster, CreateBackendRequest, CreateClusterRequest,
    CreateDirectorRequest, CreateProbeRequest, CreateTimeProfileRequest,
    CreateVarnishServerRequest, DeleteProbeRequest, Director, DirectorRouter,
    ListAuditEntriesRequest, ListBackendsRequest, Probe, ReplaceDirectorBackendsRequest, TaskState,
    TimeProfile, UpdateBackendRequest, UpdateBackendsRequest, UpdateDirectorRequest, VarnishServer,
};
use vaas_testkit::{HttpOrigin, http_get};
use vaas_tests::{StoreKind, System, backend_for, on_both_stores, respond_async, violated_fields};

on_both_stores!(
    a_partial_update_changes_only_the_named_fields,
    names_differing_only_in_case_and_second_spellings_of_an_address_are_refused,
    a_director_with_a_probe_sends_every_request_to_the_live_backend,
    a_time_profile_first_byte_timeout_cuts_a_slow_origin,
    bulk_backend_changes_reload_each_cluster_once,
    a_reverted_template_revision_serves_the_old_behaviour,
    a_template_block_and_a_variable_change_what_clients_get,
);

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
    })
}

async fn a_partial_update_changes_only_the_named_fields(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-a").await?;
    let created = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(Backend {
                weight: Some(3),
                tags: vec!["blue".into()],
                ..backend_for(&setup, origin.addr())
            }),
        })
        .await?
        .into_inner()
        .backend
        .context("backend")?;

    // Only the id and the new weight travel; every other field keeps its stored value.
    let updated = system
        .config()
        .update_backend(UpdateBackendRequest {
            backend: Some(Backend {
                id: created.id,
                weight: Some(7),
                ..Default::default()
            }),
            update_mask: mask(&["weight"]),
        })
        .await?
        .into_inner();
    let backend = updated.backend.context("backend")?;
    assert_eq!(backend.weight, Some(7));
    assert_eq!(
        Backend {
            weight: created.weight,
            ..backend.clone()
        },
        created,
        "nothing but the weight changed"
    );
    assert_eq!(updated.tasks.len(), 1, "the director's cluster reloads");
    assert_eq!(updated.tasks[0].state, TaskState::Success as i32);

    // JSON names work too, as grpcurl users write them.
    let renamed = system
        .config()
        .update_backend(UpdateBackendRequest {
            backend: Some(Backend {
                id: created.id,
                first_byte_timeout: Some(prost_types::Duration {
                    seconds: 9,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: mask(&["firstByteTimeout"]),
        })
        .await?
        .into_inner()
        .backend
        .context("backend")?;
    assert_eq!(renamed.first_byte_timeout.map(|d| d.seconds), Some(9));
    assert_eq!(renamed.tags, vec!["blue".to_owned()]);

    for (paths, why) in [
        (&["weigth"][..], "an unknown field"),
        (&["id"][..], "a read-only field"),
        (&["director_id.x"][..], "a nested path"),
    ] {
        let status = system
            .config()
            .update_backend(UpdateBackendRequest {
                backend: Some(Backend {
                    id: created.id,
                    weight: Some(50),
                    ..Default::default()
                }),
                update_mask: mask(paths),
            })
            .await
            .expect_err(why);
        assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
        assert_eq!(violated_fields(&status), ["update_mask"], "{why}");
    }
    // A masked field that fails validation names the resource's field and saves nothing.
    let status = system
        .config()
        .update_backend(UpdateBackendRequest {
            backend: Some(Backend {
                id: created.id,
                weight: Some(101),
                ..Default::default()
            }),
            update_mask: mask(&["weight"]),
        })
        .await
        .expect_err("weight 101 is out of range");
    assert_eq!(violated_fields(&status), ["backend.weight"]);
    let stored = system
        .config()
        .get_backend(vaas_proto::v1::GetBackendRequest { id: created.id })
        .await?
        .into_inner()
        .backend
        .context("backend")?;
    assert_eq!(stored, renamed, "a refused update saves nothing");

    // The history shows each saved change, who made it, and the values before and after.
    let history = system
        .config()
        .list_audit_entries(ListAuditEntriesRequest {
            resource: format!("backends/{}", created.id),
            ..Default::default()
        })
        .await?
        .into_inner()
        .audit_entries;
    let actions: Vec<i32> = history.iter().map(|entry| entry.action).collect();
    let (create, update) = (AuditAction::Create as i32, AuditAction::Update as i32);
    assert_eq!(
        actions,
        [update, update, create],
        "refused updates leave no entry"
    );
    assert_eq!(
        history[0].actor, "harness-admin",
        "the name of the caller's token"
    );
    let before = history[1].before.as_ref().context("before")?;
    assert_eq!(Backend::decode(before.value.as_slice())?.weight, Some(3));
    system.ensure_running()
}

async fn names_differing_only_in_case_and_second_spellings_of_an_address_are_refused(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let status = system
        .config()
        .create_cluster(CreateClusterRequest {
            cluster: Some(Cluster {
                name: "DEMO".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("VCL symbols are case-insensitive: DEMO collides with demo");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(violated_fields(&status), ["cluster.name"]);

    let server = system.server(setup.server_id).await?;
    let status = system
        .config()
        .create_varnish_server(CreateVarnishServerRequest {
            varnish_server: Some(VarnishServer {
                id: 0,
                address: "::ffff:127.0.0.1".into(),
                ..server.clone()
            }),
        })
        .await
        .expect_err("the same varnishd under another spelling of its address");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(violated_fields(&status), ["varnish_server.admin_port"]);

    let mut director = system.director(setup.director_id).await?;
    director.name = "vcl_recv".into();
    let status = system
        .config()
        .update_director(UpdateDirectorRequest {
            director: Some(director),
            update_mask: mask(&["name"]),
        })
        .await
        .expect_err("vcl_ names are Varnish's");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["director.name"]);

    let origin = HttpOrigin::start("origin-a").await?;
    let status = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(Backend {
                connect_timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 300_000_001,
                }),
                tags: (0..10_000).map(|index| format!("t{index}")).collect(),
                ..backend_for(&setup, origin.addr())
            }),
        })
        .await
        .expect_err("sub-millisecond durations and 10,000 tags are refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&status),
        ["backend.connect_timeout", "backend.tags"]
    );
    // Link-local addresses reach cloud metadata services: denied by default.
    let status = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(Backend {
                address: "169.254.169.254".into(),
                ..backend_for(&setup, origin.addr())
            }),
        })
        .await
        .expect_err("a backend at the metadata service");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["backend.address"]);
    assert!(
        status.message().contains("169.254.0.0/16"),
        "{}",
        status.message()
    );
    system.ensure_running()
}

/// Sends `count` requests for URLs never asked before (so none is a cache hit) through
/// varnishd and returns how many `origin` answered.
async fn answered_by(system: &System, origin: &HttpOrigin, count: usize) -> Result<usize> {
    static NEXT_URL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut answered = 0;
    for _ in 0..count {
        let n = NEXT_URL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = format!("/page-{n}");
        let response = http_get(system.varnishd(0).http_addr(), &url, "demo.example").await?;
        if response.status == 200 && response.header("x-origin") == Some(origin.name()) {
            answered += 1;
        }
    }
    Ok(answered)
}

async fn a_director_with_a_probe_sends_every_request_to_the_live_backend(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let live = HttpOrigin::start("live").await?;
    // Serves requests, but fails its health checks: only a probe keeps requests away from it.
    let sick = HttpOrigin::start_failing_health_checks("sick").await?;
    for origin in [live.addr(), sick.addr()] {
        system
            .config()
            .create_backend(CreateBackendRequest {
                backend: Some(backend_for(&setup, origin)),
            })
            .await?;
    }
    // Without a probe, round robin shares the requests between both.
    let without_probe = answered_by(&system, &live, 10).await?;
    ensure!(
        without_probe < 10,
        "without a probe the sick backend gets requests ({without_probe}/10 from the live one)"
    );

    let probe = system
        .config()
        .create_probe(CreateProbeRequest {
            probe: Some(Probe {
                name: "health".into(),
                url: "/health".into(),
                interval: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                window: Some(1),
                threshold: Some(1),
                start_as_healthy: true,
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .probe
        .context("probe")?;
    let mut director = system.director(setup.director_id).await?;
    director.probe_id = probe.id;
    let updated = system
        .config()
        .update_director(UpdateDirectorRequest {
            director: Some(director),
            update_mask: mask(&["probe_id"]),
        })
        .await?
        .into_inner();
    assert_eq!(updated.tasks[0].state, TaskState::Success as i32);

    // The first failed check marks the sick backend sick (window 1, threshold 1, every second).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = answered_by(&system, &live, 20).await?;
        if answered == 20 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the probe should steer every request to the live backend ({answered}/20; {})",
            sick.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await; // the probe's next round
    }

    let status = system
        .config()
        .delete_probe(DeleteProbeRequest { id: probe.id })
        .await
        .expect_err("a probe in use cannot be deleted");
    assert_eq!(status.code(), Code::FailedPrecondition);
    system.ensure_running()
}

async fn a_time_profile_first_byte_timeout_cuts_a_slow_origin(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let slow = HttpOrigin::start_slow("slow", Duration::from_secs(3)).await?;
    let profile = system
        .config()
        .create_time_profile(CreateTimeProfileRequest {
            time_profile: Some(TimeProfile {
                name: "impatient".into(),
                first_byte_timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .time_profile
        .context("time profile")?;
    let mut director = system.director(setup.director_id).await?;
    director.time_profile_id = profile.id;
    system
        .config()
        .update_director(UpdateDirectorRequest {
            director: Some(director),
            update_mask: mask(&["time_profile_id"]),
        })
        .await?;
    let created = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(Backend {
                inherit_time_profile: true,
                // Its own timeout would wait for the slow origin; the profile's does not.
                first_byte_timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..backend_for(&setup, slow.addr())
            }),
        })
        .await?
        .into_inner();
    assert_eq!(created.tasks[0].state, TaskState::Success as i32);

    // The origin would answer 200 after 3 s; the profile's 0.5 s first-byte timeout fails the
    // fetch first.
    let response = http_get(system.varnishd(0).http_addr(), "/slow", "demo.example").await?;
    assert_eq!(response.status, 503, "the profile's timeout cuts the fetch");
    assert_eq!(slow.requests(), 1, "the request did reach the slow origin");

    // Without inheriting, the backend's own 60 s timeout lets the slow origin answer.
    system
        .config()
        .update_backend(UpdateBackendRequest {
            backend: Some(Backend {
                id: created.backend.context("backend")?.id,
                ..Default::default()
            }),
            update_mask: mask(&["inherit_time_profile"]),
        })
        .await?;
    let response = http_get(system.varnishd(0).http_addr(), "/slow", "demo.example").await?;
    assert_eq!(response.status, 200, "the slow origin answers in time");
    assert_eq!(response.header("x-origin"), Some("slow"));
    system.ensure_running()
}

async fn bulk_backend_changes_reload_each_cluster_once(store: StoreKind) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-a").await?;
    let mut ids = Vec::new();
    for port in 1..=5 {
        let backend = Backend {
            port: Some(port),
            ..backend_for(&setup, origin.addr())
        };
        let created = system
            .config()
            .create_backend(CreateBackendRequest {
                backend: Some(backend),
            })
            .await?
            .into_inner();
        ids.push(created.backend.context("backend")?.id);
    }

    let disabled = system
        .config()
        .update_backends(UpdateBackendsRequest {
            ids: ids.clone(),
            backend: Some(Backend {
                enabled: Some(false),
                ..Default::default()
            }),
            update_mask: mask(&["enabled"]),
        })
        .await?
        .into_inner();
    assert_eq!(
        disabled.tasks.len(),
        1,
        "one task for the one cluster, not five"
    );
    assert_eq!(disabled.tasks[0].state, TaskState::Success as i32);
    assert!(disabled.backends.iter().all(|b| b.enabled == Some(false)));
    let response = http_get(system.varnishd(0).http_addr(), "/x", "demo.example").await?;
    assert_eq!(response.status, 404, "no enabled backend is left");

    let status = system
        .config()
        .update_backends(UpdateBackendsRequest {
            ids: ids.clone(),
            backend: Some(Backend::default()),
            update_mask: mask(&["*"]),
        })
        .await
        .expect_err("a bulk update names its fields");
    assert_eq!(violated_fields(&status), ["update_mask"]);

    // The director's whole set becomes the one live origin: one kept (same address and port),
    // four deleted, in one reload.
    let replaced = system
        .config()
        .replace_director_backends(ReplaceDirectorBackendsRequest {
            director_id: setup.director_id,
            backends: vec![backend_for(&setup, origin.addr())],
        })
        .await?
        .into_inner();
    assert_eq!(replaced.tasks.len(), 1);
    assert_eq!(replaced.tasks[0].state, TaskState::Success as i32);
    let listed = system
        .config()
        .list_backends(ListBackendsRequest {
            director_id: setup.director_id,
            ..Default::default()
        })
        .await?
        .into_inner()
        .backends;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].enabled, Some(true));
    let response = http_get(system.varnishd(0).http_addr(), "/x", "demo.example").await?;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-origin"), Some("origin-a"));

    let status = system
        .config()
        .replace_director_backends(ReplaceDirectorBackendsRequest {
            director_id: setup.director_id,
            backends: vec![Backend {
                address: "not-an-ip".into(),
                ..backend_for(&setup, origin.addr())
            }],
        })
        .await
        .expect_err("every backend is validated");
    assert_eq!(violated_fields(&status), ["backends[0].address"]);
    system.ensure_running()
}

/// A large but legitimate cluster: 10,000 backends in 100 directors (a snapshot of several MiB)
/// reload. Not on both stores: the store does not change what is sent, and the compile is slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_ten_thousand_backends_reloads() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-a").await?;
    let mut last_task = None;
    for director_index in 0..100_u32 {
        let director_id = if director_index == 0 {
            setup.director_id
        } else {
            let director = Director {
                name: format!("service{director_index}"),
                cluster_ids: vec![setup.cluster_id],
                router: DirectorRouter::Domain as i32,
                route_expression: format!("^service{director_index}\\.example$"),
                ..Default::default()
            };
            system
                .config()
                .create_director(respond_async(CreateDirectorRequest {
                    director: Some(director),
                }))
                .await?
                .into_inner()
                .director
                .context("director")?
                .id
        };
        let backends = (0..100_u32)
            .map(|index| {
                let n = director_index * 100 + index;
                Backend {
                    director_id,
                    address: format!("127.1.{}.{}", n / 250, n % 250 + 1),
                    port: Some(8080),
                    tags: vec![format!("rack-{}", n % 40), "bulk".into()],
                    ..backend_for(&setup, origin.addr())
                }
            })
            .collect();
        let replaced = system
            .config()
            .replace_director_backends(respond_async(ReplaceDirectorBackendsRequest {
                director_id,
                backends,
            }))
            .await?
            .into_inner();
        assert_eq!(replaced.backends.len(), 100);
        last_task = replaced.tasks.last().map(|task| task.id);
    }
    let last_task = last_task.context("the last write created a task")?;
    let finished = system.watch(last_task).await?;
    let task = finished.last().context("the watch ends with the task")?;
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    let server = system.server(setup.server_id).await?;
    let version = http_get(system.varnishd(0).http_addr(), "/vaas_version", "x").await?;
    assert_eq!(
        server.running_vcl_version,
        version.body.trim(),
        "the server runs it"
    );
    system.ensure_running()
}

async fn a_reverted_template_revision_serves_the_old_behaviour(store: StoreKind) -> Result<()> {
    use vaas_proto::v1::{
        DiffVclTemplateRevisionsRequest, ListVclTemplateRevisionsRequest, RevertVclTemplateRequest,
        UpdateVclTemplateRequest, VclTemplate,
    };
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-a").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;
    let generation =
        |response: &vaas_testkit::HttpResponse| response.header("x-generation").map(str::to_owned);
    let fetch = || http_get(system.varnishd(0).http_addr(), "/g", "demo.example");
    assert_eq!(generation(&fetch().await?), None);

    let second = "<VCL/>\nsub vcl_deliver {\n    set resp.http.X-Generation = \"two\";\n}\n";
    let updated = system
        .config()
        .update_vcl_template(UpdateVclTemplateRequest {
            vcl_template: Some(VclTemplate {
                id: setup.template_id,
                content: second.into(),
                comment: "adds a header".into(),
                ..Default::default()
            }),
            update_mask: mask(&["content", "comment"]),
        })
        .await?
        .into_inner();
    assert_eq!(updated.tasks[0].state, TaskState::Success as i32);
    assert_eq!(generation(&fetch().await?).as_deref(), Some("two"));

    let diff = system
        .config()
        .diff_vcl_template_revisions(DiffVclTemplateRevisionsRequest {
            template_id: setup.template_id,
            from_revision: 1,
            to_revision: 2,
        })
        .await?
        .into_inner()
        .diff;
    assert!(
        diff.contains("+    set resp.http.X-Generation = \"two\";"),
        "{diff}"
    );

    let reverted = system
        .config()
        .revert_vcl_template(RevertVclTemplateRequest {
            template_id: setup.template_id,
            revision: 1,
        })
        .await?
        .into_inner();
    assert_eq!(reverted.tasks[0].state, TaskState::Success as i32);
    assert_eq!(reverted.vcl_template.context("template")?.content, "<VCL/>");
    assert_eq!(
        generation(&fetch().await?),
        None,
        "the old behaviour is back"
    );

    let revisions = system
        .config()
        .list_vcl_template_revisions(ListVclTemplateRevisionsRequest {
            template_id: setup.template_id,
            ..Default::default()
        })
        .await?
        .into_inner()
        .vcl_template_revisions;
    let comments: Vec<&str> = revisions.iter().map(|r| r.comment.as_str()).collect();
    assert_eq!(comments, ["revert to revision 1", "adds a header", ""]);
    let status = system
        .config()
        .revert_vcl_template(RevertVclTemplateRequest {
            template_id: setup.template_id,
            revision: 42,
        })
        .await
        .expect_err("no such revision");
    assert_eq!(status.code(), Code::NotFound);
    system.ensure_running()
}

async fn a_template_block_and_a_variable_change_what_clients_get(store: StoreKind) -> Result<()> {
    use vaas_proto::v1::{
        CreateVclTemplateBlockRequest, CreateVclVariableRequest, UpdateVclVariableRequest,
        VclTemplateBlock, VclVariable,
    };
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-a").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;
    let variable = system
        .config()
        .create_vcl_variable(CreateVclVariableRequest {
            vcl_variable: Some(VclVariable {
                cluster_id: setup.cluster_id,
                key: "TEAM".into(),
                value: "edge".into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .vcl_variable
        .context("variable")?;
    let block = system
        .config()
        .create_vcl_template_block(CreateVclTemplateBlockRequest {
            vcl_template_block: Some(VclTemplateBlock {
                template_id: setup.template_id,
                tag: "OTHER_FUNCTIONS".into(),
                content: "<OTHER_FUNCTIONS/>\nsub vcl_deliver {\n    set resp.http.X-Team = \"#{TEAM}\";\n}"
                    .into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    assert_eq!(block.tasks[0].state, TaskState::Success as i32);
    let team = || async {
        let response = http_get(system.varnishd(0).http_addr(), "/t", "demo.example").await?;
        anyhow::Ok(response.header("x-team").map(str::to_owned))
    };
    assert_eq!(team().await?.as_deref(), Some("edge"));

    let changed = system
        .config()
        .update_vcl_variable(UpdateVclVariableRequest {
            vcl_variable: Some(VclVariable {
                id: variable.id,
                value: "core".into(),
                ..Default::default()
            }),
            update_mask: mask(&["value"]),
        })
        .await?
        .into_inner();
    assert_eq!(changed.tasks.len(), 1, "the variable's cluster reloads");
    assert_eq!(team().await?.as_deref(), Some("core"));
    system.ensure_running()
}
