//! One suite, run against both SQLite and a real PostgreSQL server.

use anyhow::Result;
use prost::Message;
use vaas_proto::v1::AuditAction;
use vaas_proto::v1::{
    Backend, Cluster, Dc, Director, Probe, ServerPhase, ServerReloadProgress, ServerStatus,
    TaskState, TimeProfile, VarnishServer, VclTemplate, VclTemplateBlock, VclVariable,
};
use vaas_store::{
    Authentication, Error, KEPT_RELOADS_PER_CLUSTER, NewToken, ReloadProgressRow, Store,
    TaskOutcome,
};

/// Opens a fresh store of each kind.
mod backends {
    use super::*;

    pub struct Fixture {
        pub store: Store,
        _dir: Option<tempfile::TempDir>,
        _postgres: Option<vaas_testkit::Postgres>,
    }

    pub async fn sqlite() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("vaas.db").display());
        Ok(Fixture {
            store: Store::connect(&url).await?,
            _dir: Some(dir),
            _postgres: None,
        })
    }

    pub async fn postgres() -> Result<Fixture> {
        let postgres = vaas_testkit::Postgres::start().await?;
        Ok(Fixture {
            store: Store::connect(&postgres.url()).await?,
            _dir: None,
            _postgres: Some(postgres),
        })
    }
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() -> anyhow::Result<()> {
                let fixture = super::backends::sqlite().await?;
                super::$name(&fixture.store).await
            })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() -> anyhow::Result<()> {
                let fixture = super::backends::postgres().await?;
                super::$name(&fixture.store).await
            })*
        }
    };
}

on_both_stores!(
    writes_create_tasks_only_for_clusters_with_servers,
    timestamps_strictly_increase_and_outbox_follows_tasks,
    references_and_uniqueness_are_checked_and_nothing_is_saved,
    finishing_tasks_records_cluster_status,
    snapshot_contains_what_the_cluster_serves,
    pages_walk_every_item_once,
    every_kind_of_change_reloads_exactly_the_clusters_it_touches,
    a_partial_update_merges_into_the_stored_item,
    probes_and_time_profiles_round_trip_and_reach_the_snapshot,
    every_write_leaves_an_audit_entry_with_who_and_the_values_before_and_after,
    template_saves_keep_revisions_and_blocks_and_variables_reload_their_clusters,
    lists_filter_by_what_operators_look_for,
    pages_stay_readable_by_any_grpc_client,
    a_huge_compiler_message_is_capped_before_it_is_stored,
    a_transient_failure_leaves_tasks_in_retry_for_the_next_attempt,
    tokens_are_kept_hashed_and_stop_working_when_revoked_or_expired,
    a_leader_that_lost_its_lease_cannot_finish_tasks,
    a_task_shows_each_servers_progress_in_its_newest_reload_and_old_reloads_are_pruned,
    concurrent_writes_commit_together_and_a_refused_one_loses_nothing_else,
    a_reload_records_what_each_of_its_servers_runs_at_once,
);

struct World {
    dc: Dc,
    cluster: Cluster,
    template: VclTemplate,
    server: VarnishServer,
    director: Director,
}

async fn world(store: &Store) -> Result<World> {
    let dc = store
        .create(&Dc {
            id: 0,
            name: "Frankfurt".into(),
            symbol: "fra-1".into(),
        })
        .await?
        .value;
    let cluster = store
        .create(&Cluster {
            name: "prod".into(),
            ..Default::default()
        })
        .await?
        .value;
    let template = store
        .create(&VclTemplate {
            name: "default".into(),
            content: "<VCL/>".into(),
            ..Default::default()
        })
        .await?
        .value;
    let server = store
        .create(&VarnishServer {
            address: "127.0.0.1".into(),
            http_port: Some(80),
            admin_port: Some(6082),
            status: ServerStatus::Active as i32,
            dc_id: dc.id,
            template_id: template.id,
            cluster_id: cluster.id,
            ..Default::default()
        })
        .await?
        .value;
    let director = store
        .create(&Director {
            name: "api".into(),
            cluster_ids: vec![cluster.id],
            route_expression: "^/api/".into(),
            active_active: Some(true),
            enabled: Some(true),
            ..Default::default()
        })
        .await?
        .value;
    Ok(World {
        dc,
        cluster,
        template,
        server,
        director,
    })
}

fn backend(world: &World, address: &str) -> Backend {
    Backend {
        director_id: world.director.id,
        dc_id: world.dc.id,
        address: address.into(),
        port: Some(8080),
        weight: Some(1),
        max_connections: Some(5),
        enabled: Some(true),
        ..Default::default()
    }
}

async fn writes_create_tasks_only_for_clusters_with_servers(store: &Store) -> Result<()> {
    let dc = store
        .create(&Dc {
            id: 0,
            name: "A".into(),
            symbol: "a".into(),
        })
        .await?;
    assert!(dc.tasks.is_empty(), "a new dc affects no cluster");
    let empty_cluster = store
        .create(&Cluster {
            name: "empty".into(),
            ..Default::default()
        })
        .await?
        .value;
    let updated = store
        .update(&Cluster {
            labels: vec!["env:test".into()],
            ..empty_cluster.clone()
        })
        .await?;
    assert!(
        updated.tasks.is_empty(),
        "a cluster without servers needs no reload"
    );
    assert_eq!(updated.value.labels, vec!["env:test".to_owned()]);

    let world = world(store).await?;
    let created = store.create(&backend(&world, "10.0.0.1")).await?;
    assert_eq!(created.tasks.len(), 1);
    let task = &created.tasks[0];
    assert_eq!(task.cluster_id, world.cluster.id);
    assert_eq!(task.cluster_name, "prod");
    assert_eq!(task.state, TaskState::Pending as i32);
    assert_eq!(
        task.description,
        format!("create backend {}", created.value.id)
    );
    assert_eq!(task.name, format!("tasks/{}", task.id));

    let renamed = store
        .update(&Dc {
            name: "Frankfurt 1".into(),
            ..world.dc.clone()
        })
        .await?;
    assert_eq!(
        renamed.tasks.len(),
        1,
        "a dc change reloads the clusters using it"
    );
    Ok(())
}

async fn timestamps_strictly_increase_and_outbox_follows_tasks(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let mut last = None;
    let mut task_ids = Vec::new();
    for index in 0..5 {
        let outcome = store
            .create(&backend(&world, &format!("10.0.0.{index}")))
            .await?;
        let timestamp = outcome.tasks[0].timestamp.expect("timestamp");
        let micros = timestamp.seconds * 1_000_000 + i64::from(timestamp.nanos / 1000);
        if let Some(previous) = last {
            assert!(micros > previous, "timestamps must strictly increase");
        }
        last = Some(micros);
        task_ids.push(outcome.tasks[0].id);
    }
    let outbox = store.pending_outbox(100).await?;
    let outbox_tasks: Vec<i64> = outbox.iter().map(|entry| entry.task_id).collect();
    // The world's server and director creation made tasks too; the backends' come last.
    assert!(outbox_tasks.ends_with(&task_ids));
    for entry in &outbox {
        store.delete_outbox(entry.id).await?;
    }
    assert!(store.pending_outbox(100).await?.is_empty());
    Ok(())
}

async fn references_and_uniqueness_are_checked_and_nothing_is_saved(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let missing_cluster = store
        .create(&VarnishServer {
            cluster_id: 999,
            address: "10.1.1.1".into(),
            ..world.server.clone()
        })
        .await;
    assert!(matches!(
        missing_cluster,
        Err(Error::MissingReference {
            field: "varnish_server.cluster_id",
            id: 999,
            ..
        })
    ));
    let duplicate = store
        .create(&Director {
            id: 0,
            ..world.director.clone()
        })
        .await;
    assert!(matches!(
        duplicate,
        Err(Error::AlreadyExists {
            field: "director.name",
            ..
        })
    ));
    let colliding = store
        .create(&Dc {
            id: 0,
            name: "other".into(),
            symbol: "fra_1".into(),
        })
        .await;
    assert!(
        matches!(
            colliding,
            Err(Error::AlreadyExists {
                field: "dc.symbol",
                ..
            })
        ),
        "fra_1 and fra-1 are the same name in VCL"
    );
    let in_use = store.delete::<Cluster>(world.cluster.id).await;
    assert!(matches!(
        in_use,
        Err(Error::InUse {
            resource: "cluster",
            ..
        })
    ));
    let (servers, _) = store
        .list::<VarnishServer>(&Default::default(), 100, "")
        .await?;
    assert_eq!(servers.len(), 1, "the refused server was not saved");
    let (tasks, _) = store.list_tasks(100, "", 0, 0).await?;
    assert_eq!(
        tasks.len(),
        2,
        "only the world's server and director made tasks"
    );
    assert!(matches!(
        store.get::<Backend>(42).await,
        Err(Error::NotFound {
            resource: "backend",
            id: 42
        })
    ));
    Ok(())
}

async fn finishing_tasks_records_cluster_status(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let first = store.create(&backend(&world, "10.0.0.1")).await?.tasks[0].clone();
    let pending = store.unfinished_clusters().await?;
    assert_eq!(pending.len(), 1);
    let (cluster_id, newest) = pending[0];
    assert_eq!(cluster_id, world.cluster.id);

    let started = store.start_tasks(cluster_id, newest).await?;
    assert_eq!(
        started.len(),
        3,
        "server, director and backend tasks start together"
    );
    assert!(
        started
            .iter()
            .all(|task| task.state == TaskState::Started as i32)
    );

    let second = store.create(&backend(&world, "10.0.0.2")).await?.tasks[0].clone();
    let failed = store
        .finish_tasks(
            cluster_id,
            newest,
            &TaskOutcome::Failure("VCL compilation failed".into()),
        )
        .await?;
    assert_eq!(
        failed.len(),
        3,
        "the newer task is not finished by an older snapshot"
    );
    assert!(
        failed
            .iter()
            .all(|task| task.state == TaskState::Failure as i32)
    );
    let cluster = store.get::<Cluster>(cluster_id).await?;
    assert_eq!(cluster.last_error, "VCL compilation failed");
    assert_eq!(failed[0].error, "VCL compilation failed");
    assert_eq!(cluster.error_timestamp, first.timestamp);
    assert_eq!(cluster.reload_timestamp, None);
    assert_eq!(
        store.get_task(second.id).await?.state,
        TaskState::Pending as i32
    );

    let succeeded = store
        .finish_tasks(cluster_id, i64::MAX, &TaskOutcome::Success)
        .await?;
    assert_eq!(succeeded.len(), 1);
    assert_eq!(
        store.get::<Cluster>(cluster_id).await?.reload_timestamp,
        second.timestamp
    );
    assert!(store.unfinished_clusters().await?.is_empty());
    Ok(())
}

async fn snapshot_contains_what_the_cluster_serves(store: &Store) -> Result<()> {
    let world = world(store).await?;
    store.create(&backend(&world, "10.0.0.1")).await?;
    store
        .create(&Backend {
            enabled: Some(false),
            ..backend(&world, "10.0.0.2")
        })
        .await?;
    let snapshot = store.cluster_snapshot(world.cluster.id).await?;
    assert_eq!(snapshot.servers.len(), 1);
    assert_eq!(snapshot.templates, vec![world.template.clone()]);
    assert_eq!(snapshot.directors.len(), 1);
    assert_eq!(snapshot.backends.len(), 1, "disabled backends are left out");
    assert_eq!(snapshot.dcs, vec![world.dc.clone()]);
    let newest = store.unfinished_clusters().await?[0].1;
    assert_eq!(
        snapshot.version, newest,
        "the snapshot includes the newest committed change"
    );

    let reported = store
        .record_agent_report(
            "127.0.0.1",
            6082,
            "abc123",
            &vaas_store::VarnishSettings {
                unsafe_settings: &["vcc_unsafe_path is on".into()],
                cc_command: "exec gcc -O2 -o %o %s",
            },
        )
        .await?;
    assert_eq!(reported, Some(world.server.id));
    let server = store.get::<VarnishServer>(world.server.id).await?;
    assert_eq!(server.running_vcl_version, "abc123");
    assert_eq!(server.unsafe_settings, ["vcc_unsafe_path is on"]);
    assert_eq!(server.cc_command, "exec gcc -O2 -o %o %s");
    Ok(())
}

async fn pages_walk_every_item_once(store: &Store) -> Result<()> {
    for index in 0..7 {
        store
            .create(&Dc {
                id: 0,
                name: format!("dc {index}"),
                symbol: format!("dc{index}"),
            })
            .await?;
    }
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let (dcs, next) = store.list::<Dc>(&Default::default(), 3, &token).await?;
        seen.extend(dcs.into_iter().map(|dc| dc.symbol));
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(
        seen,
        (0..7).map(|index| format!("dc{index}")).collect::<Vec<_>>()
    );
    assert!(matches!(
        store.list::<Dc>(&Default::default(), 3, "garbage").await,
        Err(Error::InvalidPageToken)
    ));
    Ok(())
}

/// The clusters that got a task, by name, in order.
fn reloaded<T>(outcome: &vaas_store::WriteOutcome<T>) -> Vec<String> {
    let mut names: Vec<String> = outcome
        .tasks
        .iter()
        .map(|task| task.cluster_name.clone())
        .collect();
    names.sort();
    names
}

async fn every_kind_of_change_reloads_exactly_the_clusters_it_touches(store: &Store) -> Result<()> {
    let dc = |name: &str| Dc {
        id: 0,
        name: name.into(),
        symbol: name.into(),
    };
    let (x, y) = (
        store.create(&dc("x")).await?.value,
        store.create(&dc("y")).await?.value,
    );
    let mut clusters = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let cluster = Cluster {
            name: name.into(),
            ..Default::default()
        };
        clusters.push(store.create(&cluster).await?.value);
    }
    let [a, b, c, d] = [0, 1, 2, 3].map(|index| clusters[index].clone());
    let template = |name: &str| VclTemplate {
        name: name.into(),
        content: "<VCL/>".into(),
        ..Default::default()
    };
    let t1 = store.create(&template("t1")).await?.value;
    let t2 = store.create(&template("t2")).await?.value;
    let server =
        |address: &str, dc: &Dc, template: &VclTemplate, cluster: &Cluster| VarnishServer {
            address: address.into(),
            http_port: Some(80),
            admin_port: Some(6082),
            status: ServerStatus::Active as i32,
            dc_id: dc.id,
            template_id: template.id,
            cluster_id: cluster.id,
            ..Default::default()
        };
    let server_a = store.create(&server("10.0.1.1", &x, &t1, &a)).await?.value;
    store.create(&server("10.0.1.2", &x, &t1, &b)).await?;
    // A second server keeps cluster a reloadable when server_a leaves it.
    store.create(&server("10.0.1.5", &x, &t1, &a)).await?;
    store.create(&server("10.0.1.3", &y, &t2, &c)).await?;
    let disabled = VarnishServer {
        status: ServerStatus::Disabled as i32,
        ..server("10.0.1.4", &y, &t2, &d)
    };
    let created_disabled = store.create(&disabled).await?;
    assert_eq!(
        reloaded(&created_disabled),
        Vec::<String>::new(),
        "disabled servers get no VCL"
    );
    let director = |name: &str, clusters: Vec<i64>| Director {
        name: name.into(),
        cluster_ids: clusters,
        route_expression: format!("^/{name}/"),
        ..Default::default()
    };
    let d1 = store.create(&director("d1", vec![a.id])).await?;
    assert_eq!(reloaded(&d1), ["a"], "a new director reloads its clusters");
    let d1 = d1.value;
    let d2 = store.create(&director("d2", vec![b.id, c.id])).await?.value;
    let d3 = store.create(&director("d3", vec![d.id])).await?;
    assert_eq!(
        reloaded(&d3),
        Vec::<String>::new(),
        "d has only a disabled server"
    );
    let in_dc = |director: &Director, dc: &Dc, address: &str| Backend {
        director_id: director.id,
        dc_id: dc.id,
        address: address.into(),
        port: Some(80),
        ..Default::default()
    };

    let b1 = store.create(&in_dc(&d1, &y, "10.0.2.1")).await?;
    assert_eq!(
        reloaded(&b1),
        ["a"],
        "a new backend reloads its director's clusters"
    );
    let b2 = store.create(&in_dc(&d2, &y, "10.0.2.2")).await?;
    assert_eq!(reloaded(&b2), ["b", "c"]);
    let moved = store
        .update(&in_dc(&d2, &y, "10.0.2.1").with_id(b1.value.id))
        .await?;
    assert_eq!(
        reloaded(&moved),
        ["a", "b", "c"],
        "old and new director's clusters"
    );
    let deleted = store.delete::<Backend>(b2.value.id).await?;
    assert_eq!(reloaded(&deleted), ["b", "c"]);

    let d1_moved = store
        .update(&director("d1", vec![c.id]).with_id(d1.id))
        .await?;
    assert_eq!(
        reloaded(&d1_moved),
        ["a", "c"],
        "clusters it left and joined"
    );

    let renamed_x = store
        .update(&Dc {
            name: "x2".into(),
            ..x.clone()
        })
        .await?;
    assert_eq!(reloaded(&renamed_x), ["a", "b"], "servers in x");
    let renamed_y = store
        .update(&Dc {
            name: "y2".into(),
            ..y.clone()
        })
        .await?;
    assert_eq!(
        reloaded(&renamed_y),
        ["b", "c"],
        "server in y, and d2's backend in y"
    );

    let t2_changed = store
        .update(&VclTemplate {
            comment: "v2".into(),
            ..t2.clone()
        })
        .await?;
    assert_eq!(
        reloaded(&t2_changed),
        ["c"],
        "the servers running it (d's is disabled)"
    );
    let a_changed = store
        .update(&Cluster {
            labels: vec!["env:prod".into()],
            ..a.clone()
        })
        .await?;
    assert_eq!(reloaded(&a_changed), ["a"]);

    let server_moved = store
        .update(&VarnishServer {
            cluster_id: b.id,
            ..server_a.clone()
        })
        .await?;
    assert_eq!(
        reloaded(&server_moved),
        ["a", "b"],
        "the server's old and new cluster"
    );
    let server_deleted = store.delete::<VarnishServer>(server_a.id).await?;
    assert_eq!(
        reloaded(&server_deleted),
        Vec::<String>::new(),
        "no other server's VCL changes"
    );

    let new_dc = store.create(&dc("z")).await?;
    let new_cluster = store
        .create(&Cluster {
            name: "e".into(),
            ..Default::default()
        })
        .await?;
    let new_template = store.create(&template("t3")).await?;
    assert!(
        new_dc.tasks.is_empty() && new_cluster.tasks.is_empty() && new_template.tasks.is_empty()
    );
    Ok(())
}

async fn a_partial_update_merges_into_the_stored_item(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let created = store.create(&backend(&world, "10.0.0.1")).await?.value;
    let outcome = store
        .update_with(created.id, |stored: &Backend| {
            Ok::<_, vaas_store::Error>(Backend {
                weight: Some(7),
                ..stored.clone()
            })
        })
        .await?;
    assert_eq!(outcome.value.weight, Some(7));
    assert_eq!(outcome.value.address, "10.0.0.1", "other fields are kept");
    assert_eq!(outcome.tasks.len(), 1, "the director's cluster is reloaded");
    let refused = store
        .update_with(created.id, |_: &Backend| {
            Err::<Backend, _>(Error::InvalidPageToken)
        })
        .await;
    assert!(matches!(refused, Err(Error::InvalidPageToken)));
    assert_eq!(
        store.get::<Backend>(created.id).await?.weight,
        Some(7),
        "a refused change saves nothing"
    );
    let missing = store
        .update_with(4242, |stored: &Backend| Ok::<_, Error>(stored.clone()))
        .await;
    assert!(matches!(
        missing,
        Err(Error::NotFound {
            resource: "backend",
            id: 4242
        })
    ));
    Ok(())
}

/// Sets the id of a message built for a create, to update the stored item.
trait WithId {
    fn with_id(self, id: i64) -> Self;
}

impl WithId for Backend {
    fn with_id(self, id: i64) -> Backend {
        Backend { id, ..self }
    }
}

impl WithId for Director {
    fn with_id(self, id: i64) -> Director {
        Director { id, ..self }
    }
}

async fn probes_and_time_profiles_round_trip_and_reach_the_snapshot(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let seconds = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let probe = Probe {
        name: "health".into(),
        url: "/health".into(),
        expected_response: Some(204),
        interval: seconds(2),
        timeout: seconds(1),
        window: Some(4),
        threshold: Some(2),
        start_as_healthy: true,
        ..Default::default()
    };
    let created_probe = store.create(&probe).await?;
    assert!(created_probe.tasks.is_empty(), "no director uses it yet");
    let probe = created_probe.value;
    assert_eq!(store.get::<Probe>(probe.id).await?, probe, "round trip");
    let profile = TimeProfile {
        name: "slow".into(),
        description: "for slow services".into(),
        max_connections: Some(50),
        connect_timeout: seconds(1),
        first_byte_timeout: seconds(30),
        between_bytes_timeout: seconds(10),
        service_mesh_timeout: seconds(60),
        ..Default::default()
    };
    let profile = store.create(&profile).await?.value;
    assert_eq!(store.get::<TimeProfile>(profile.id).await?, profile);

    let director = store
        .update(&Director {
            probe_id: probe.id,
            time_profile_id: profile.id,
            remove_path: true,
            r#virtual: true,
            service_mesh_label: "api".into(),
            ..world.director.clone()
        })
        .await?
        .value;
    assert_eq!(
        (
            director.probe_id,
            director.time_profile_id,
            director.remove_path,
            director.r#virtual
        ),
        (probe.id, profile.id, true, true)
    );
    store
        .create(&Backend {
            inherit_time_profile: true,
            ..backend(&world, "10.0.0.1")
        })
        .await?;

    let changed = store
        .update(&Probe {
            url: "/ready".into(),
            ..probe.clone()
        })
        .await?;
    assert_eq!(
        reloaded(&changed),
        ["prod"],
        "the clusters of the directors using it"
    );
    let changed = store
        .update(&TimeProfile {
            max_connections: Some(60),
            ..profile.clone()
        })
        .await?;
    assert_eq!(reloaded(&changed), ["prod"]);

    let snapshot = store.cluster_snapshot(world.cluster.id).await?;
    assert_eq!(snapshot.probes.len(), 1);
    assert_eq!(snapshot.probes[0].url, "/ready");
    assert_eq!(snapshot.time_profiles[0].max_connections, Some(60));
    assert!(snapshot.backends[0].inherit_time_profile);

    assert!(
        matches!(
            store.delete::<Probe>(probe.id).await,
            Err(Error::InUse { .. })
        ),
        "a probe in use stays"
    );
    let missing = store
        .update(&Director {
            probe_id: 4242,
            ..director.clone()
        })
        .await;
    assert!(
        matches!(
            missing,
            Err(Error::MissingReference {
                field: "director.probe_id",
                ..
            })
        ),
        "{missing:?}"
    );
    store
        .update(&Director {
            probe_id: 0,
            ..director
        })
        .await?;
    store.delete::<Probe>(probe.id).await?;
    Ok(())
}

async fn every_write_leaves_an_audit_entry_with_who_and_the_values_before_and_after(
    store: &Store,
) -> Result<()> {
    let world = world(store).await?;
    let alice = store.acting_as("alice");
    let created = alice.create(&backend(&world, "10.0.0.1")).await?.value;
    let updated = alice
        .update(&Backend {
            weight: Some(9),
            ..created.clone()
        })
        .await?
        .value;
    store.acting_as("bob").delete::<Backend>(created.id).await?;
    let refused = alice.delete::<Dc>(world.dc.id).await;
    assert!(refused.is_err(), "the dc is in use");

    let name = format!("backends/{}", created.id);
    let (entries, next) = store.list_audit_entries(&name, 10, "").await?;
    assert!(next.is_empty());
    let actions: Vec<(i32, &str)> = entries
        .iter()
        .map(|entry| (entry.action, entry.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (AuditAction::Delete as i32, "bob"),
            (AuditAction::Update as i32, "alice"),
            (AuditAction::Create as i32, "alice"),
        ],
        "newest first; a refused write leaves nothing"
    );
    let decode = |any: &Option<prost_types::Any>| -> Result<Option<Backend>> {
        Ok(match any {
            Some(any) => {
                assert_eq!(any.type_url, "type.googleapis.com/vaas.v1.Backend");
                Some(Backend::decode(any.value.as_slice())?)
            }
            None => None,
        })
    };
    assert_eq!(decode(&entries[1].before)?, Some(created.clone()));
    assert_eq!(decode(&entries[1].after)?, Some(updated.clone()));
    assert_eq!(decode(&entries[0].before)?, Some(updated));
    assert_eq!(decode(&entries[0].after)?, None);
    assert_eq!(entries[2].resource, name);
    let micros = |entry: &vaas_proto::v1::AuditEntry| {
        entry
            .time
            .map(|time| (time.seconds, time.nanos))
            .unwrap_or_default()
    };
    assert!(
        micros(&entries[0]) > micros(&entries[1]),
        "store timestamps order the history"
    );

    let (all_backends, _) = store.list_audit_entries("backends", 100, "").await?;
    assert_eq!(all_backends.len(), 3);
    let (everything, _) = store.list_audit_entries("", 100, "").await?;
    assert_eq!(everything.len(), 3 + 5, "the world's five creates too");
    assert!(matches!(
        store.list_audit_entries("backends/x", 10, "").await,
        Err(Error::InvalidResourceName { .. })
    ));
    Ok(())
}

async fn template_saves_keep_revisions_and_blocks_and_variables_reload_their_clusters(
    store: &Store,
) -> Result<()> {
    let world = world(store).await?;
    let carol = store.acting_as("carol");
    carol
        .update(&VclTemplate {
            content: "<VCL/>\n# two".into(),
            comment: "second".into(),
            ..world.template.clone()
        })
        .await?;
    let (revisions, _) = store
        .list_template_revisions(world.template.id, 10, "")
        .await?;
    let numbers: Vec<(i64, &str, &str)> = revisions
        .iter()
        .map(|revision| {
            (
                revision.revision,
                revision.comment.as_str(),
                revision.actor.as_str(),
            )
        })
        .collect();
    assert_eq!(
        numbers,
        [(2, "second", "carol"), (1, "", "vaas-store")],
        "newest first, with who saved each"
    );
    let first = store.get_template_revision(world.template.id, 1).await?;
    assert_eq!(first.content, "<VCL/>");
    assert!(matches!(
        store.get_template_revision(world.template.id, 9).await,
        Err(Error::RevisionNotFound { revision: 9, .. })
    ));

    let block = store
        .create(&VclTemplateBlock {
            template_id: world.template.id,
            tag: "RECV".into(),
            content: "sub vcl_recv { <ROUTER/> }".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        reloaded(&block),
        ["prod"],
        "the clusters running the template"
    );
    let duplicate = store
        .create(&VclTemplateBlock {
            id: 0,
            ..block.value.clone()
        })
        .await;
    assert!(
        matches!(
            duplicate,
            Err(Error::AlreadyExists {
                field: "vcl_template_block.tag",
                ..
            })
        ),
        "one block per template and tag"
    );
    let variable = store
        .create(&VclVariable {
            cluster_id: world.cluster.id,
            key: "TEAM".into(),
            value: "edge".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(reloaded(&variable), ["prod"]);
    let snapshot = store.cluster_snapshot(world.cluster.id).await?;
    assert_eq!(snapshot.template_blocks, [block.value]);
    assert_eq!(snapshot.variables, std::slice::from_ref(&variable.value));
    let (listed, _) = store
        .list::<VclVariable>(
            &vaas_proto::v1::ListVclVariablesRequest {
                cluster_id: world.cluster.id,
                ..Default::default()
            },
            10,
            "",
        )
        .await?;
    assert_eq!(listed, [variable.value]);
    Ok(())
}

async fn lists_filter_by_what_operators_look_for(store: &Store) -> Result<()> {
    use vaas_proto::v1::{ListBackendsRequest, ListDirectorsRequest, ListVarnishServersRequest};
    let world = world(store).await?;
    let other_dc = store
        .create(&Dc {
            id: 0,
            name: "Warsaw".into(),
            symbol: "waw".into(),
        })
        .await?
        .value;
    let mut addresses = Vec::new();
    for (index, (dc, enabled, tags)) in [
        (world.dc.id, true, vec!["canary".to_owned()]),
        (
            world.dc.id,
            false,
            vec!["blue".to_owned(), "canary_x".to_owned()],
        ),
        (other_dc.id, true, vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let created = store
            .create(&Backend {
                dc_id: dc,
                enabled: Some(enabled),
                tags,
                ..backend(&world, &format!("10.1.0.{index}"))
            })
            .await?
            .value;
        addresses.push(created.address);
    }
    let backends = |filter: ListBackendsRequest| async move {
        let (found, _) = store.list::<Backend>(&filter, 100, "").await?;
        anyhow::Ok(found.into_iter().map(|b| b.address).collect::<Vec<_>>())
    };
    assert_eq!(
        backends(ListBackendsRequest {
            dc_id: world.dc.id,
            ..Default::default()
        })
        .await?,
        addresses[..2]
    );
    assert_eq!(
        backends(ListBackendsRequest {
            enabled: Some(false),
            ..Default::default()
        })
        .await?,
        addresses[1..2]
    );
    assert_eq!(
        backends(ListBackendsRequest {
            tag: "canary".into(),
            ..Default::default()
        })
        .await?,
        addresses[..1],
        "a whole tag, not a prefix of one (canary_x), and _ is no wildcard"
    );
    assert_eq!(
        backends(ListBackendsRequest {
            address_prefix: "10.1.0.2".into(),
            ..Default::default()
        })
        .await?,
        addresses[2..]
    );
    let (directors, _) = store
        .list::<Director>(
            &ListDirectorsRequest {
                name_prefix: "AP".into(),
                cluster_id: world.cluster.id,
                ..Default::default()
            },
            10,
            "",
        )
        .await?;
    assert_eq!(directors.len(), 1, "name prefixes ignore case");
    let (servers, _) = store
        .list::<VarnishServer>(
            &ListVarnishServersRequest {
                status: ServerStatus::Maintenance as i32,
                ..Default::default()
            },
            10,
            "",
        )
        .await?;
    assert!(servers.is_empty(), "the only server is active");
    Ok(())
}

async fn pages_stay_readable_by_any_grpc_client(store: &Store) -> Result<()> {
    use prost::Message;
    for index in 0..5 {
        store
            .create(&VclTemplate {
                name: format!("big{index}"),
                content: "x".repeat(1024 * 1024),
                ..Default::default()
            })
            .await?;
    }
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let (page, next) = store
            .list::<VclTemplate>(&Default::default(), 1000, &token)
            .await?;
        let bytes: usize = page.iter().map(Message::encoded_len).sum();
        assert!(bytes < 4 * 1024 * 1024, "a page of {bytes} bytes");
        seen += page.len();
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(seen, 5, "every template on some page");
    Ok(())
}

async fn a_huge_compiler_message_is_capped_before_it_is_stored(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let task = store.create(&backend(&world, "10.0.0.1")).await?.tasks[0].clone();
    let newest = task
        .timestamp
        .map(|t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000));
    let failed = store
        .finish_tasks(
            world.cluster.id,
            newest.unwrap_or(i64::MAX),
            &TaskOutcome::Failure("x".repeat(200_000)),
        )
        .await?;
    assert_eq!(failed[0].error.len(), vaas_store::TASK_ERROR_MAX_CHARS);
    let cluster = store.get::<Cluster>(world.cluster.id).await?;
    assert_eq!(cluster.last_error.len(), vaas_store::LAST_ERROR_MAX_CHARS);
    Ok(())
}

async fn a_transient_failure_leaves_tasks_in_retry_for_the_next_attempt(
    store: &Store,
) -> Result<()> {
    let world = world(store).await?;
    store.create(&backend(&world, "10.0.0.1")).await?;
    let (cluster_id, newest) = store.unfinished_clusters().await?[0];
    let first_start = store.start_tasks(cluster_id, newest).await?[0].start_time;

    let retrying = store
        .finish_tasks(cluster_id, newest, &TaskOutcome::Retry("agent gone".into()))
        .await?;
    assert!(
        retrying
            .iter()
            .all(|task| task.state == TaskState::Retry as i32
                && task.error == "agent gone"
                && task.finish_time.is_none())
    );
    assert_eq!(
        store.unfinished_clusters().await?,
        vec![(cluster_id, newest)],
        "a task waiting for a retry is unfinished"
    );
    assert_eq!(
        store.get::<Cluster>(cluster_id).await?.last_error,
        "agent gone"
    );

    let again = store.start_tasks(cluster_id, newest).await?;
    assert_eq!(
        again.len(),
        retrying.len(),
        "the next attempt starts them again"
    );
    assert_eq!(again[0].start_time, first_start, "the first start is kept");
    store
        .finish_tasks(cluster_id, newest, &TaskOutcome::Success)
        .await?;
    assert!(store.unfinished_clusters().await?.is_empty());
    Ok(())
}

async fn tokens_are_kept_hashed_and_stop_working_when_revoked_or_expired(
    store: &Store,
) -> Result<()> {
    let world = world(store).await?;
    let new = |name: &str, role, server, seconds| NewToken {
        name: name.into(),
        role,
        varnish_server_id: server,
        ttl: std::time::Duration::from_secs(seconds),
    };
    let admin = store.acting_as("bootstrap");
    let (token, secret) = admin
        .create_token(&new("ops", vaas_proto::v1::Role::Editor, 0, 3600))
        .await?;
    assert!(secret.starts_with(vaas_store::SECRET_PREFIX) && secret.len() > 60);
    assert_eq!(token.created_by, "bootstrap");
    assert_eq!(
        store.authenticate(&secret).await?,
        Authentication::Valid(token.clone())
    );
    assert_eq!(
        store.authenticate("vaas_guess").await?,
        Authentication::Unknown
    );
    assert!(matches!(
        admin
            .create_token(&new("OPS", vaas_proto::v1::Role::Reader, 0, 3600))
            .await,
        Err(Error::AlreadyExists { field: "name", .. })
    ));
    assert!(matches!(
        admin
            .create_token(&new("agent-x", vaas_proto::v1::Role::Agent, 4242, 3600))
            .await,
        Err(Error::MissingReference { .. })
    ));
    let (agent, _) = admin
        .create_token(&new(
            "agent-1",
            vaas_proto::v1::Role::Agent,
            world.server.id,
            3600,
        ))
        .await?;
    assert_eq!(agent.varnish_server_id, world.server.id);

    let revoked = admin.revoke_token(token.id).await?;
    assert!(revoked.revoke_time.is_some());
    assert!(matches!(
        store.authenticate(&secret).await?,
        Authentication::Revoked(_)
    ));
    assert_eq!(
        admin.revoke_token(token.id).await?.revoke_time,
        revoked.revoke_time,
        "revoking twice keeps the first time"
    );

    let (_, short) = admin
        .create_token(&new("short", vaas_proto::v1::Role::Reader, 0, 1))
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // past its lifetime
    assert!(matches!(
        store.authenticate(&short).await?,
        Authentication::Expired(_)
    ));

    let stored = store.list_audit_entries("access_tokens", 10, "").await?.0;
    assert_eq!(stored.len(), 4, "three creations and one revocation");
    assert!(stored.iter().all(|entry| entry.actor == "bootstrap"));
    let (listed, _) = store.list_tokens(0, "").await?;
    assert_eq!(listed.len(), 3);
    Ok(())
}

async fn a_leader_that_lost_its_lease_cannot_finish_tasks(store: &Store) -> Result<()> {
    let world = world(store).await?;
    store.create(&backend(&world, "10.0.0.1")).await?;
    let (cluster_id, newest) = store.unfinished_clusters().await?[0];
    let ttl = std::time::Duration::from_secs(60);
    let old_term = store
        .acquire_leader_lease("old", ttl)
        .await?
        .expect("a free lease");
    let old_leader = store.fenced(old_term);
    assert!(!old_leader.start_tasks(cluster_id, newest).await?.is_empty());

    // The old leader is paused; its lease ends and another replica takes it.
    store.release_leader_lease("old", old_term).await?;
    let new_term = store
        .acquire_leader_lease("new", ttl)
        .await?
        .expect("a released lease");
    let refused = old_leader
        .finish_tasks(cluster_id, newest, &TaskOutcome::Failure("late".into()))
        .await;
    assert!(
        matches!(refused, Err(Error::Fenced { term, current }) if term == old_term && current == new_term),
        "{refused:?}"
    );
    assert_eq!(
        store.unfinished_clusters().await?,
        vec![(cluster_id, newest)],
        "nothing was finished by the old leader"
    );
    let finished = store
        .fenced(new_term)
        .finish_tasks(cluster_id, newest, &TaskOutcome::Success)
        .await?;
    assert!(
        finished
            .iter()
            .all(|task| task.state == TaskState::Success as i32)
    );
    Ok(())
}

async fn a_task_shows_each_servers_progress_in_its_newest_reload_and_old_reloads_are_pruned(
    store: &Store,
) -> Result<()> {
    let world = world(store).await?;
    let created = store.create(&backend(&world, "10.0.0.1")).await?;
    let task_id = created.tasks[0].id;
    assert!(
        store.get_task(task_id).await?.servers.is_empty(),
        "no progress before the reload starts"
    );
    let (cluster_id, version) = store.unfinished_clusters().await?[0];
    store.start_tasks(cluster_id, version).await?;
    let row = |version: i64, phase: ServerPhase| ReloadProgressRow {
        cluster_id,
        version,
        progress: ServerReloadProgress {
            varnish_server_id: world.server.id,
            address: world.server.address.clone(),
            phase: phase as i32,
            compile_duration: Some(prost_types::Duration {
                seconds: 1,
                nanos: 250_000_000,
            }),
            error: "x".repeat(10_000),
            update_time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5000,
            }),
            ..Default::default()
        },
    };
    store
        .record_reload_progress(&[row(version, ServerPhase::Compiling)])
        .await?;
    store
        .record_reload_progress(&[row(version, ServerPhase::Active)])
        .await?;
    let servers = store.get_task(task_id).await?.servers;
    assert_eq!(
        servers.len(),
        1,
        "one row per server and reload: {servers:?}"
    );
    assert_eq!(servers[0].phase, ServerPhase::Active as i32);
    assert_eq!(
        servers[0].compile_duration,
        row(0, ServerPhase::Active).progress.compile_duration
    );
    assert_eq!(
        servers[0].update_time,
        row(0, ServerPhase::Active).progress.update_time
    );
    assert_eq!(
        servers[0].render_duration, None,
        "an unset duration stays unset"
    );
    assert_eq!(
        servers[0].error.chars().count(),
        vaas_store::LAST_ERROR_MAX_CHARS,
        "a huge error is capped"
    );

    // Later reloads of the cluster: the task keeps showing its own, the cluster shows the newest,
    // and only the newest reloads are kept.
    for later in 1..=KEPT_RELOADS_PER_CLUSTER + 5 {
        store
            .record_reload_progress(&[row(version + later, ServerPhase::Rendering)])
            .await?;
    }
    let (newest, progress) = store
        .newest_reload_progress(cluster_id)
        .await?
        .expect("progress is kept");
    let newest_version = version + KEPT_RELOADS_PER_CLUSTER + 5;
    assert_eq!(
        newest,
        prost_types::Timestamp {
            seconds: newest_version.div_euclid(1_000_000),
            nanos: (newest_version.rem_euclid(1_000_000) * 1000) as i32,
        }
    );
    assert_eq!(progress[0].phase, ServerPhase::Rendering as i32);
    assert!(
        store.get_task(task_id).await?.servers.is_empty(),
        "the task's reload is older than the newest {KEPT_RELOADS_PER_CLUSTER} and was pruned"
    );
    Ok(())
}

/// Returns a task's store timestamp in microseconds.
fn task_micros(task: &vaas_proto::v1::Task) -> i64 {
    let timestamp = task.timestamp.expect("a task has a timestamp");
    timestamp.seconds * 1_000_000 + i64::from(timestamp.nanos / 1000)
}

async fn concurrent_writes_commit_together_and_a_refused_one_loses_nothing_else(
    store: &Store,
) -> Result<()> {
    let world = world(store).await?;
    let writes = 96;
    // Every fourth write names a DC that does not exist; they run among the others, so most of
    // them share a batch with writes that are saved.
    let mut running = tokio::task::JoinSet::new();
    for index in 0..writes {
        let store = store.clone();
        let mut item = backend(&world, &format!("10.0.1.{index}"));
        if index % 4 == 3 {
            item.dc_id = 999;
        }
        running.spawn(async move { (index, store.create(&item).await) });
    }
    // Meanwhile snapshots are read: each must hold exactly the writes up to its version.
    let reader = {
        let store = store.clone();
        let cluster_id = world.cluster.id;
        tokio::spawn(async move {
            let mut snapshots = Vec::new();
            for _ in 0..20 {
                snapshots.push(store.cluster_snapshot(cluster_id).await?);
                tokio::task::yield_now().await;
            }
            anyhow::Ok(snapshots)
        })
    };
    let mut saved = std::collections::BTreeMap::new();
    while let Some(joined) = running.join_next().await {
        let (index, outcome) = joined?;
        if index % 4 == 3 {
            assert!(
                matches!(
                    outcome,
                    Err(Error::MissingReference {
                        field: "backend.dc_id",
                        id: 999,
                        ..
                    })
                ),
                "write {index}: {outcome:?}"
            );
        } else {
            let outcome = outcome?;
            assert_eq!(outcome.tasks.len(), 1, "write {index} reloads its cluster");
            saved.insert(
                outcome.value.address.clone(),
                task_micros(&outcome.tasks[0]),
            );
        }
    }
    let (stored, _) = store.list::<Backend>(&Default::default(), 1000, "").await?;
    let stored: Vec<String> = stored.into_iter().map(|backend| backend.address).collect();
    let expected: Vec<String> = saved.keys().cloned().collect();
    let mut stored_sorted = stored.clone();
    stored_sorted.sort();
    assert_eq!(
        stored_sorted, expected,
        "every accepted write is saved, no refused one"
    );
    let mut timestamps: Vec<i64> = saved.values().copied().collect();
    timestamps.sort_unstable();
    timestamps.dedup();
    assert_eq!(
        timestamps.len(),
        saved.len(),
        "every write has its own timestamp"
    );
    let outbox = store.pending_outbox(1000).await?;
    let (tasks, _) = store.list_tasks(1000, "", 0, 0).await?;
    assert_eq!(outbox.len(), tasks.len(), "one outbox row per task");
    assert_eq!(tasks.len(), saved.len() + 2, "the world made two tasks");
    for snapshot in reader.await?? {
        let mut seen: Vec<String> = snapshot
            .backends
            .iter()
            .map(|backend| backend.address.clone())
            .collect();
        seen.sort();
        let upto: Vec<String> = saved
            .iter()
            .filter(|(_, micros)| **micros <= snapshot.version)
            .map(|(address, _)| address.clone())
            .collect();
        assert_eq!(
            seen, upto,
            "snapshot at {} sees every write up to it",
            snapshot.version
        );
    }
    Ok(())
}

async fn a_reload_records_what_each_of_its_servers_runs_at_once(store: &Store) -> Result<()> {
    let world = world(store).await?;
    let mut servers = vec![world.server.clone()];
    for address in ["127.0.0.2", "127.0.0.3"] {
        let server = VarnishServer {
            id: 0,
            address: address.into(),
            ..world.server.clone()
        };
        servers.push(store.create(&server).await?.value);
    }
    let (first, second, failed) = (servers[0].id, servers[1].id, servers[2].id);
    store
        .record_server_syncs(1_000, &[(first, None), (second, None), (failed, None)])
        .await?;
    let huge = "e".repeat(100_000);
    store
        .record_server_syncs(2_000, &[(first, None), (failed, Some(&huge))])
        .await?;
    let read = |id: i64| store.get::<VarnishServer>(id);
    let micros = |server: &VarnishServer| {
        server
            .synced_timestamp
            .map(|t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000))
    };
    assert_eq!(micros(&read(first).await?), Some(2_000));
    assert_eq!(
        micros(&read(second).await?),
        Some(1_000),
        "left out: unchanged"
    );
    let failed = read(failed).await?;
    assert_eq!(
        micros(&failed),
        Some(1_000),
        "a failed server keeps what it ran"
    );
    assert_eq!(failed.sync_error.len(), vaas_store::LAST_ERROR_MAX_CHARS);
    assert_eq!(read(first).await?.sync_error, "");
    Ok(())
}
