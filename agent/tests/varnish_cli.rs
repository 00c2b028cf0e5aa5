//! The CLI client and the renderer's output against a real varnishd.

#[path = "../vcl/tests/fixtures/mod.rs"]
mod fixtures;
mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use support::{Varnishd, http_get};
use vaas_agent::varnish_cli::{ChildState, CliError, CliStatus, VarnishCli};
use vaas_proto::v1::ClusterSnapshot;

/// Renders `snapshot` for the fixtures' server, loads it as `name` and makes it active.
async fn load_and_use(cli: &mut VarnishCli, name: &str, snapshot: &ClusterSnapshot) -> String {
    let vcl = vaas_vcl::render(snapshot, fixtures::SERVER_ID).expect("render");
    let started = Instant::now();
    if let Err(error) = cli.vcl_inline(name, &vcl.text).await {
        panic!("{name} does not compile: {error}\n{}", vcl.text);
    }
    eprintln!("vcl.inline {name}: {:?}", started.elapsed());
    cli.vcl_use(name).await.expect("vcl.use");
    vcl.version
}

async fn start_child(cli: &mut VarnishCli) {
    if cli.status().await.expect("status") != ChildState::Running {
        cli.start().await.expect("start");
    }
}

#[tokio::test]
async fn authenticates_and_reads_the_banner() {
    let varnishd = Varnishd::start().await;
    let mut cli = varnishd.cli().await;
    assert!(
        cli.banner().contains("Varnish Cache CLI"),
        "{}",
        cli.banner()
    );
    let version = cli.varnish_version().expect("version in banner");
    assert!(version.starts_with("varnish-"), "{version}");
    cli.ping().await.expect("ping");
    assert_eq!(cli.status().await.expect("status"), ChildState::Stopped);
    assert!(cli.vcl_list().await.expect("vcl.list").is_empty());
}

#[tokio::test]
async fn a_wrong_secret_is_rejected() {
    let varnishd = Varnishd::start().await;
    let error = VarnishCli::connect(varnishd.admin, b"wrong\n", support::timeouts())
        .await
        .expect_err("wrong secret accepted");
    match error {
        CliError::Auth { status, .. } => assert_eq!(status, CliStatus::Close),
        other => panic!("unexpected error: {other}"),
    }
    // The right secret still works afterwards.
    varnishd.cli().await.ping().await.expect("ping");
}

#[tokio::test]
async fn errors_carry_the_status_and_invalid_names_are_refused_locally() {
    let varnishd = Varnishd::start().await;
    let mut cli = varnishd.cli().await;
    let error = cli.vcl_use("missing").await.expect_err("no such vcl");
    assert_eq!(error.status(), Some(CliStatus::Param));
    let response = cli.raw(&["no.such.command"]).await.expect("answered");
    assert_eq!(response.status, CliStatus::Unknown);
    assert!(matches!(
        cli.vcl_use("bad name").await,
        Err(CliError::InvalidVclName(_))
    ));
    // The connection is still usable after refused commands.
    cli.ping().await.expect("ping");
}

#[tokio::test]
async fn every_rendered_fixture_compiles() {
    let varnishd = Varnishd::start().await;
    let mut cli = varnishd.cli().await;
    for (index, (name, snapshot)) in fixtures::all().into_iter().enumerate() {
        let vcl_name = format!("fixture-{index}-{}", name.replace('_', "-"));
        load_and_use(&mut cli, &vcl_name, &snapshot).await;
    }
    let list = cli.vcl_list().await.expect("vcl.list");
    assert_eq!(list.len(), fixtures::all().len());
}

#[tokio::test]
async fn a_bad_vcl_gives_the_compiler_message_and_the_active_vcl_keeps_serving() {
    let varnishd = Varnishd::start().await;
    let mut cli = varnishd.cli().await;
    let version = load_and_use(&mut cli, "good", &fixtures::empty_cluster()).await;
    start_child(&mut cli).await;
    let before = http_get(varnishd.http, "example.com", "/vaas_version").await;
    assert_eq!(before.status, 200);
    assert_eq!(before.vcl_version(), Some(version.as_str()));
    assert_eq!(before.body, version);

    let started = Instant::now();
    let error = cli
        .vcl_inline(
            "bad",
            "vcl 4.1;\nbackend b { .host = \"127.0.0.1\"; }\nsub vcl_recv { set nothing; }\n",
        )
        .await
        .expect_err("bad vcl compiled");
    eprintln!("failed vcl.inline: {:?}", started.elapsed());
    match &error {
        CliError::Command { status, body, .. } => {
            assert_eq!(*status, CliStatus::Param);
            assert!(body.contains("VCC-compiler"), "{body}");
            assert!(body.contains("('<vcl.inline>' Line 3 Pos"), "{body}");
        }
        other => panic!("unexpected error: {other}"),
    }
    let after = http_get(varnishd.http, "example.com", "/vaas_version").await;
    assert_eq!(after.vcl_version(), Some(version.as_str()));
    let names: Vec<_> = cli
        .vcl_list()
        .await
        .expect("vcl.list")
        .into_iter()
        .map(|vcl| (vcl.name, vcl.status))
        .collect();
    assert_eq!(names, [("good".to_owned(), "active".to_owned())]);
}

#[tokio::test]
async fn requests_reach_the_origin_through_a_path_routed_director() {
    let varnishd = Varnishd::start().await;
    let origin = support::start_origin(IpAddr::V4(Ipv4Addr::LOCALHOST), "hello from origin")
        .await
        .expect("origin");
    let snapshot = fixtures::one_director("127.0.0.1", u32::from(origin.port()));
    let mut cli = varnishd.cli().await;
    let version = load_and_use(&mut cli, "routed", &snapshot).await;
    start_child(&mut cli).await;

    let proxied = http_get(varnishd.http, "example.com", "/api/hello").await;
    assert_eq!(proxied.status, 200, "{proxied:?}");
    assert_eq!(proxied.body, "hello from origin");
    assert_eq!(
        proxied.headers.get("x-origin").map(String::as_str),
        Some("test")
    );
    assert_eq!(proxied.vcl_version(), Some(version.as_str()));

    let unrouted = http_get(varnishd.http, "example.com", "/elsewhere").await;
    assert_eq!(unrouted.status, 404);
    assert_eq!(unrouted.body, "no director matches the request");
    assert_eq!(unrouted.vcl_version(), Some(version.as_str()));

    let status = http_get(varnishd.http, "example.com", "/vaas_status").await;
    assert_eq!((status.status, status.body.as_str()), (200, "OK"));
}

#[tokio::test]
async fn template_blocks_and_cluster_variables_change_what_clients_see() {
    let varnishd = Varnishd::start().await;
    let origin = support::start_origin(IpAddr::V4(Ipv4Addr::LOCALHOST), "hello from origin")
        .await
        .expect("origin");
    // OTHER_FUNCTIONS wraps the built-in one and adds X-Team = #{TEAM}, TEAM being "edge".
    let mut snapshot = fixtures::blocks_and_variables();
    snapshot.backends[0].address = "127.0.0.1".into();
    snapshot.backends[0].port = Some(u32::from(origin.port()));
    let mut cli = varnishd.cli().await;
    let version = load_and_use(&mut cli, "blocks", &snapshot).await;
    start_child(&mut cli).await;

    // The RECV block still routes, and both vcl_deliver bodies run.
    let proxied = http_get(varnishd.http, "example.com", "/api/hello").await;
    assert_eq!(proxied.status, 200, "{proxied:?}");
    assert_eq!(proxied.body, "hello from origin");
    assert_eq!(
        proxied.headers.get("x-team").map(String::as_str),
        Some("edge"),
        "{proxied:?}"
    );
    assert_eq!(proxied.vcl_version(), Some(version.as_str()));
    let status = http_get(varnishd.http, "example.com", "/vaas_status").await;
    assert_eq!((status.status, status.body.as_str()), (200, "OK"));

    // Another value for the variable is another VCL, and another header.
    let team = snapshot
        .variables
        .iter_mut()
        .find(|variable| variable.key == "TEAM")
        .expect("TEAM");
    team.value = "core".into();
    let changed = load_and_use(&mut cli, "blocks-core", &snapshot).await;
    assert_ne!(changed, version);
    let proxied = http_get(varnishd.http, "example.com", "/api/again").await;
    assert_eq!(
        proxied.headers.get("x-team").map(String::as_str),
        Some("core"),
        "{proxied:?}"
    );
}

#[tokio::test]
async fn empty_directors_and_maintenance_answer_synthetic_responses() {
    let varnishd = Varnishd::start().await;
    let mut snapshot = fixtures::multi_dc();
    snapshot.servers[0].status = vaas_proto::v1::ServerStatus::Maintenance as i32;
    let mut cli = varnishd.cli().await;
    let version = load_and_use(&mut cli, "maintenance", &snapshot).await;
    start_child(&mut cli).await;

    // Not example.com: that host is routed to the "www" director before any path.
    let empty = http_get(varnishd.http, "other.test", "/empty/x").await;
    assert_eq!(empty.status, 404, "{empty:?}");
    assert_eq!(empty.body, "director empty has no backends", "{empty:?}");
    assert_eq!(empty.vcl_version(), Some(version.as_str()));

    let status = http_get(varnishd.http, "example.com", "/vaas_status").await;
    assert_eq!((status.status, status.body.as_str()), (503, "Maintenance"));
    let by_host = http_get(varnishd.http, "www.example.com", "/empty/x").await;
    assert_ne!(
        by_host.body, "director empty has no backends",
        "{by_host:?}"
    );
    assert_eq!(status.vcl_version(), Some(version.as_str()));
}

#[tokio::test]
async fn ipv6_backends_are_reached_when_the_machine_has_ipv6() {
    let Some(origin) =
        support::start_origin(IpAddr::V6(Ipv6Addr::LOCALHOST), "hello over ipv6").await
    else {
        eprintln!("no IPv6 loopback on this machine: only the compile check ran");
        return;
    };
    let varnishd = Varnishd::start().await;
    let snapshot = fixtures::one_director("::1", u32::from(origin.port()));
    let mut cli = varnishd.cli().await;
    load_and_use(&mut cli, "ipv6", &snapshot).await;
    start_child(&mut cli).await;
    let proxied = http_get(varnishd.http, "example.com", "/api/x").await;
    assert_eq!(
        (proxied.status, proxied.body.as_str()),
        (200, "hello over ipv6")
    );
}

/// Returns the health ("healthy" or "sick") varnishd reports for every backend of the active
/// VCL whose name ends with `suffix`, from `backend.list -j`.
async fn backend_health(cli: &mut VarnishCli, suffix: &str) -> Vec<String> {
    let response = cli
        .command(&["backend.list", "-j"])
        .await
        .expect("backend.list");
    // [version, command, timestamp, {"<vcl>.<backend>": {"probe_message": [good, window,
    // "healthy" | "sick"], ..}, ..}]
    let list: serde_json::Value = serde_json::from_str(&response.body).expect("json");
    let backends = list
        .get(3)
        .and_then(serde_json::Value::as_object)
        .unwrap_or_else(|| panic!("unexpected backend.list: {}", response.body));
    backends
        .iter()
        .filter(|(name, _)| name.ends_with(suffix))
        .map(|(_, backend)| {
            let healthy = backend["probe_message"][2] == "healthy";
            (if healthy { "healthy" } else { "sick" }).to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_probed_director_sends_every_request_to_its_live_backend() {
    let varnishd = Varnishd::start().await;
    let live = support::start_origin(IpAddr::V4(Ipv4Addr::LOCALHOST), "hello from live")
        .await
        .expect("origin");
    // Nothing listens there: connections are refused, so its probes fail.
    let dead = support::free_port();
    let mut snapshot = fixtures::empty_cluster();
    let mut starts_healthy = fixtures::probe(50, "starts_healthy", "/health");
    starts_healthy.start_as_healthy = true;
    let mut starts_sick = fixtures::probe(51, "starts_sick", "/health");
    for probe in [&mut starts_healthy, &mut starts_sick] {
        probe.interval = Some(fixtures::millis(100));
        probe.timeout = Some(fixtures::millis(100));
    }
    snapshot.probes = vec![starts_healthy, starts_sick];
    let mut first = fixtures::director(20, "first", "^/first/");
    first.probe_id = 50;
    let mut second = fixtures::director(21, "second", "^/second/");
    second.probe_id = 51;
    snapshot.directors = vec![first, second];
    let origin = |id, director_id, port: u16| {
        let mut backend = fixtures::backend(id, director_id, 1, "127.0.0.1");
        backend.port = Some(u32::from(port));
        backend
    };
    snapshot.backends = vec![
        origin(30, 20, live.port()),
        origin(31, 20, dead.port()),
        origin(32, 21, live.port()),
        origin(33, 21, dead.port()),
    ];
    let mut cli = varnishd.cli().await;
    load_and_use(&mut cli, "probed", &snapshot).await;
    start_child(&mut cli).await;

    // Wait on health as varnishd reports it: the live backends pass, the dead ones fail.
    // Backend names end with the address and the port.
    let live_suffix = format!("_127_0_0_1_{}", live.port());
    let dead_suffix = format!("_127_0_0_1_{}", dead.port());
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let live_health = backend_health(&mut cli, &live_suffix).await;
        let dead_health = backend_health(&mut cli, &dead_suffix).await;
        if live_health == ["healthy", "healthy"] && dead_health == ["sick", "sick"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "live {live_health:?}, dead {dead_health:?}: {}",
            cli.command(&["backend.list", "-p"])
                .await
                .expect("backend.list")
                .body
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    for path in ["/first/a", "/second/b"] {
        for attempt in 0..10 {
            let response =
                http_get(varnishd.http, "example.com", &format!("{path}{attempt}")).await;
            assert_eq!(
                (response.status, response.body.as_str()),
                (200, "hello from live"),
                "{path}{attempt}: {response:?}"
            );
        }
    }
}
