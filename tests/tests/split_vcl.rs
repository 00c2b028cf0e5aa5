//! Split VCLs (a top VCL handing requests to shard VCLs by label) serve what the single VCL
//! serves, and a backend change recompiles only its director's shard.

#[path = "../../agent/vcl/tests/fixtures/mod.rs"]
mod fixtures;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use vaas_agent::varnish_cli::{ChildState, CliTimeouts, VarnishCli};
use vaas_proto::v1::{
    Backend, ClusterSnapshot, Director, DirectorRouter, RouteAction, RouteLeft, RouteOperator,
    UpdateBackendRequest, UpdateDirectorRequest,
};
use vaas_testkit::{HttpOrigin, Varnishd, http_get, http_request};
use vaas_tests::{StoreKind, System};
use vaas_vcl::{SplitOptions, SplitVcl};

/// Every shard in its own VCL even for a handful of backends.
const SPLIT: SplitOptions = SplitOptions {
    shards: 4,
    min_backends: 1,
};

/// Directors of every router and option (remove_path, HTTPS only, two DCs, no backends, a
/// virtual one), routes that pass and pipe, and redirects of every kind of domain mapping.
fn rich_snapshot() -> ClusterSnapshot {
    use RouteLeft::{Header, Host, Url};
    use RouteOperator::{Equal, Matches, NotMatches};
    let mut snapshot = fixtures::redirects();
    let mut www = fixtures::director(22, "www", "^(www\\.)?example\\.com$");
    www.router = DirectorRouter::Domain as i32;
    let mut strip = fixtures::director(23, "strip", "^/strip/");
    strip.remove_path = true;
    let mut hidden = fixtures::director(26, "hidden", "^/hidden/");
    hidden.r#virtual = true;
    snapshot.directors.extend([
        www,
        strip,
        fixtures::director(24, "empty", "^/empty/"),
        fixtures::director(25, "shop", "^/shop/"),
        hidden,
    ]);
    snapshot.backends.extend([
        fixtures::backend(32, 22, 1, "10.0.0.1"),
        fixtures::backend(33, 23, 1, "10.0.0.1"),
        fixtures::backend(34, 23, 2, "10.0.0.1"),
        fixtures::backend(35, 25, 2, "10.0.0.1"),
        fixtures::backend(36, 26, 1, "10.0.0.1"),
    ]);
    let mut pipe = fixtures::route(
        81,
        5,
        25,
        vec![fixtures::condition(Url, "", Matches, "^/api/socket")],
    );
    pipe.action = RouteAction::Pipe as i32;
    snapshot.routes = vec![
        fixtures::route(
            80,
            10,
            25,
            vec![
                fixtures::condition(Url, "", Matches, "^/api/v2/"),
                fixtures::condition(Header, "X-Beta", Equal, "1"),
            ],
        ),
        pipe,
        fixtures::route(
            82,
            20,
            24,
            vec![fixtures::condition(Url, "", Matches, "^/api/empty")],
        ),
        fixtures::route(
            83,
            30,
            21,
            vec![
                fixtures::condition(Host, "", Equal, "secure.example"),
                fixtures::condition(Url, "", NotMatches, "\\.css$"),
            ],
        ),
    ];
    snapshot
}

/// A request: path, host and extra headers.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Requests covering every branch of [`rich_snapshot`].
const REQUESTS: &[Case] = &[
    ("/vaas_status", "x", &[]),
    ("/api/a", "other.example", &[]),
    ("/api/v2/x", "other.example", &[("X-Beta", "1")]),
    ("/api/v2/x", "other.example", &[]),
    ("/api/socket", "other.example", &[]),
    ("/api/empty", "other.example", &[]),
    ("/secure/a", "other.example", &[]),
    (
        "/secure/a",
        "other.example",
        &[("X-Forwarded-Proto", "https")],
    ),
    ("/page", "secure.example", &[("X-Forwarded-Proto", "https")]),
    (
        "/page.css",
        "secure.example",
        &[("X-Forwarded-Proto", "https")],
    ),
    ("/", "www.example.com", &[]),
    ("/old/path?q=1", "example.com", &[]),
    ("/promo?a=b", "www.example.com", &[]),
    ("/x", "example.com", &[("X-Beta", "")]),
    ("/any", "shop.example.org", &[]),
    ("/cart", "shop.prod.example.net", &[]),
    ("/strip/deep/path", "other.example", &[]),
    ("/empty/x", "other.example", &[]),
    ("/shop/item", "other.example", &[]),
    ("/hidden/x", "other.example", &[]),
    ("/nowhere", "other.example", &[]),
];

/// Points every backend of `snapshot` at the origin of its director (named like it).
fn point_at_origins(snapshot: &mut ClusterSnapshot, origins: &BTreeMap<i64, HttpOrigin>) {
    for backend in &mut snapshot.backends {
        let origin = &origins[&backend.director_id];
        backend.address = origin.addr().ip().to_string();
        backend.port = Some(u32::from(origin.addr().port()));
    }
}

async fn cli(varnishd: &Varnishd) -> Result<VarnishCli> {
    let secret = std::fs::read(varnishd.secret_file())?;
    Ok(VarnishCli::connect(varnishd.admin_addr(), &secret, CliTimeouts::default()).await?)
}

/// Loads a split VCL as the agent does: each shard as `vaasd-<version>` labelled with its
/// number, the version VCL with its label, then the top VCL, which becomes active.
async fn load_split(cli: &mut VarnishCli, split: &SplitVcl) -> Result<()> {
    for (index, shard) in &split.shards {
        let name = format!("vaasd-{}", shard.version);
        cli.vcl_inline(&name, &shard.text)
            .await
            .with_context(|| format!("shard does not compile:\n{}", shard.text))?;
        cli.vcl_label(&vaas_vcl::shard_label(*index), &name).await?;
    }
    cli.vcl_inline("version", &split.version_vcl.text)
        .await
        .with_context(|| format!("version vcl does not compile:\n{}", split.version_vcl.text))?;
    cli.vcl_label(vaas_vcl::VERSION_LABEL, "version").await?;
    cli.vcl_inline("top", &split.top.text)
        .await
        .with_context(|| format!("top does not compile:\n{}", split.top.text))?;
    cli.vcl_use("top").await?;
    Ok(())
}

async fn start_child(cli: &mut VarnishCli) -> Result<()> {
    if cli.status().await? != ChildState::Running {
        cli.start().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_vcl_serves_every_request_as_the_single_vcl_does() -> Result<()> {
    let mut snapshot = rich_snapshot();
    let mut origins = BTreeMap::new();
    for director in &snapshot.directors {
        origins.insert(director.id, HttpOrigin::start(&director.name).await?);
    }
    point_at_origins(&mut snapshot, &origins);
    let single = vaas_vcl::render(&snapshot, fixtures::SERVER_ID)?;
    let split = vaas_vcl::render_split(&snapshot, fixtures::SERVER_ID, SPLIT)?
        .context("the built-in template splits")?;
    ensure!(
        split.shards.len() >= 2,
        "the directors spread over {} shards only",
        split.shards.len()
    );
    let declared = |text: &str| {
        text.lines()
            .filter(|line| line.starts_with("backend "))
            .count()
    };
    ensure!(
        declared(&split.top.text) == 1,
        "the top VCL declares only the placeholder backend:\n{}",
        split.top.text
    );

    let (single_varnishd, split_varnishd) = (Varnishd::start().await?, Varnishd::start().await?);
    let mut single_cli = cli(&single_varnishd).await?;
    single_cli.vcl_inline("single", &single.text).await?;
    single_cli.vcl_use("single").await?;
    start_child(&mut single_cli).await?;
    let mut split_cli = cli(&split_varnishd).await?;
    load_split(&mut split_cli, &split).await?;
    start_child(&mut split_cli).await?;

    let compared = ["x-origin", "x-echo-url", "location", "content-type"];
    for (path, host, headers) in REQUESTS {
        let expected =
            http_request(single_varnishd.http_addr(), "GET", path, host, headers).await?;
        let served = http_request(split_varnishd.http_addr(), "GET", path, host, headers).await?;
        let what = format!("GET {path} (Host: {host}, {headers:?})");
        ensure!(
            (served.status, &served.body) == (expected.status, &expected.body),
            "{what}: split {served:?}, single {expected:?}"
        );
        for header in compared {
            ensure!(
                served.header(header) == expected.header(header),
                "{what}: {header} split {:?}, single {:?}",
                served.header(header),
                expected.header(header)
            );
        }
        // Synthetic answers come from the top VCL and carry its version.
        if expected.header("x-origin").is_none() && expected.header("x-vaas-vcl-version").is_some()
        {
            ensure!(
                served.header("x-vaas-vcl-version") == Some(split.top.version.as_str()),
                "{what}: {served:?}"
            );
        }
    }
    // The routes and directors really were tried: the cases above reach most origins.
    let reached = origins
        .values()
        .filter(|origin| origin.requests() > 0)
        .count();
    ensure!(reached >= 5, "only {reached} origins were reached");
    let version = http_get(split_varnishd.http_addr(), "/vaas_version", "x").await?;
    ensure!(version.body.trim() == split.version(), "{version:?}");
    ensure!(version.status == 200, "{version:?}");
    ensure!(
        version.header("x-vaas-vcl-version") == Some(split.version()),
        "{version:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_backend_change_changes_one_shard_and_keeps_the_others() -> Result<()> {
    let mut snapshot = rich_snapshot();
    let before = vaas_vcl::render_split(&snapshot, fixtures::SERVER_ID, SPLIT)?.context("split")?;
    let backend = snapshot
        .backends
        .iter_mut()
        .find(|backend| backend.id == 35)
        .context("shop's backend")?;
    backend.port = Some(8081);
    let after = vaas_vcl::render_split(&snapshot, fixtures::SERVER_ID, SPLIT)?.context("split")?;
    let versions = |split: &SplitVcl| -> Vec<(usize, String)> {
        split
            .shards
            .iter()
            .map(|(index, shard)| (*index, shard.version.clone()))
            .collect()
    };
    let changed: Vec<_> = versions(&after)
        .into_iter()
        .filter(|version| !versions(&before).contains(version))
        .collect();
    ensure!(changed.len() == 1, "changed shards: {changed:?}");
    // Every shard is one the top VCL hands requests to (the virtual director has none).
    for (index, _) in &after.shards {
        let label = vaas_vcl::shard_label(*index);
        ensure!(
            after.top.text.contains(&format!("vcl({label})")),
            "{label} is named by no route or router entry"
        );
    }
    // The top VCL names shards by number: a backend change leaves it as it was.
    ensure!(before.top == after.top, "the top VCL changed");
    ensure!(
        before.version() != after.version(),
        "the server's version changes"
    );
    // Below the threshold, or with a custom template, the VCL is one.
    let unsplit = SplitOptions {
        shards: 4,
        min_backends: 1000,
    };
    ensure!(vaas_vcl::render_split(&snapshot, fixtures::SERVER_ID, unsplit)?.is_none());
    snapshot.templates[0].content = "<VCL/>\nsub vcl_recv { return (restart); }\n".into();
    ensure!(vaas_vcl::render_split(&snapshot, fixtures::SERVER_ID, SPLIT)?.is_none());
    Ok(())
}

/// What varnishd has loaded of a split VCL, once the agent's collection after a commit is
/// done: the active VCL's name and the shard VCLs, each pointed at by its label.
async fn settled(system: &System) -> Result<(String, BTreeSet<String>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = system.varnishd(0).varnishadm(&["vcl.list"]).await?;
        let rows: Vec<Vec<&str>> = list
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        let shards: BTreeSet<String> = rows
            .iter()
            .filter_map(|row| row.get(4).filter(|name| name.starts_with("vaasd-")))
            .map(|name| (*name).to_owned())
            .collect();
        let labelled: BTreeSet<String> = rows
            .iter()
            .filter(|row| {
                row.get(4)
                    .is_some_and(|name| name.starts_with("vaas_shard_"))
            })
            .filter_map(|row| row.get(6).map(|target| (*target).to_owned()))
            .collect();
        let active = rows
            .iter()
            .find(|row| row.first() == Some(&"active"))
            .and_then(|row| row.get(4))
            .map(|name| (*name).to_owned());
        if let Some(active) = active
            && shards == labelled
        {
            return Ok((active, shards));
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "shard vcls not collected:\n{list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_vaas_a_backend_change_compiles_one_shard_and_survives_a_varnishd_restart()
-> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite)
        .split_vcl(SPLIT.shards, SPLIT.min_backends)
        .start()
        .await?;
    let setup = system.set_up().await?;
    // The set-up director takes every path: it gets its own.
    system
        .config()
        .update_director(UpdateDirectorRequest {
            director: Some(Director {
                id: setup.director_id,
                route_expression: "^/demo/".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["route_expression".into()],
            }),
        })
        .await?;
    // Four directors, so the shards are several.
    let mut origins = Vec::new();
    let mut backends = Vec::new();
    for n in 0..4 {
        let origin = HttpOrigin::start(&format!("origin-{n}")).await?;
        let (_, backend) = system
            .create_director_with_backend(
                &setup,
                &format!("svc{n}"),
                &format!("^/svc{n}/"),
                origin.addr(),
            )
            .await?;
        origins.push(origin);
        backends.push(backend);
    }
    let (top_before, before) = settled(&system).await?;
    ensure!(before.len() >= 2, "shard vcls: {before:?}");
    for (n, origin) in origins.iter().enumerate() {
        let served = http_get(system.varnishd(0).http_addr(), &format!("/svc{n}/x"), "h").await?;
        ensure!(
            served.header("x-origin") == Some(origin.name()),
            "{served:?}"
        );
    }

    // Backend changes: each compiles one new shard VCL, which replaces the old one; the top VCL
    // is the same VCL as before (not compiled again), and nothing piles up.
    for round in 0..3 {
        let moved = HttpOrigin::start(&format!("moved-{round}")).await?;
        system
            .config()
            .update_backend(UpdateBackendRequest {
                backend: Some(Backend {
                    id: backends[0].id,
                    port: Some(u32::from(moved.addr().port())),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["port".into()],
                }),
            })
            .await?;
        // A URL not cached yet: the cache is shared by every VCL.
        let path = format!("/svc0/after-{round}");
        let served = http_get(system.varnishd(0).http_addr(), &path, "h").await?;
        ensure!(
            served.header("x-origin") == Some(moved.name()),
            "{served:?}"
        );
        let (top_after, after) = settled(&system).await?;
        ensure!(top_after == top_before, "{top_after} replaced {top_before}");
        ensure!(
            after.len() == before.len() && after.difference(&before).count() == 1,
            "shard vcls: {after:?} (first {before:?})"
        );
    }
    let running = system.server(setup.server_id).await?.running_vcl_version;
    let version = http_get(system.varnishd(0).http_addr(), "/vaas_version", "x").await?;
    ensure!(version.body.trim() == running, "{version:?} vs {running}");

    // varnishd restarts empty: the agent restores the top VCL and its shards.
    system.restart_varnishd(0).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let served = http_get(system.varnishd(0).http_addr(), "/svc3/x", "h").await;
        if served
            .as_ref()
            .is_ok_and(|served| served.header("x-origin") == Some(origins[3].name()))
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not served after the restart: {served:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let version = http_get(system.varnishd(0).http_addr(), "/vaas_version", "x").await?;
    ensure!(version.body.trim() == running, "{version:?} vs {running}");
    // A backend added afterwards lands too: the restored VCL's shards are reused, not redone.
    let extra = HttpOrigin::start("extra").await?;
    system
        .create_director_with_backend(&setup, "late", "^/late/", extra.addr())
        .await?;
    let served = http_get(system.varnishd(0).http_addr(), "/late/x", "h").await?;
    ensure!(served.header("x-origin") == Some("extra"), "{served:?}");
    system.ensure_running()?;
    Ok(())
}
