//! The routing rules of the rendered VCL, as a client of a real varnishd sees them.
//!
//! Each test builds a cluster snapshot by hand, renders one server's VCL with the pure renderer
//! (`vaas_vcl::render`), loads it into its own varnishd and sends requests through it to
//! [`HttpOrigin`]s that answer with their name. The tests prove the rules the renderer documents:
//! host routes before path routes, one origin per path route, the fall back to other datacenters
//! only for active_active directors, canary servers served by canary backends only, the synthetic
//! 404s, `remove_path`, and virtual directors that are never routed. No VaaS binary runs here.

#[path = "../../agent/vcl/tests/fixtures/mod.rs"]
mod fixtures;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fixtures::SERVER_ID;
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli};
use vaas_proto::v1::{Backend, ClusterSnapshot, DirectorMode, DirectorRouter, VarnishServer};
use vaas_testkit::{HttpOrigin, HttpResponse, Varnishd, http_get};

/// The name every test loads its VCL under.
const VCL_NAME: &str = "routing";

/// How long a probed backend may take to turn healthy after the VCL is loaded.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(15);

/// Renders the VCL of server `server_id` from `snapshot`, loads it into a new varnishd, makes it
/// active and starts the cache child; returns the varnishd, ready for requests.
async fn serve(snapshot: &ClusterSnapshot, server_id: i64) -> Result<Varnishd> {
    let vcl = vaas_vcl::render(snapshot, server_id)
        .with_context(|| format!("cannot render the VCL of server {server_id}"))?;
    let varnishd = Varnishd::start().await?;
    let secret = std::fs::read(varnishd.secret_file()).context("cannot read the secret file")?;
    let mut cli = VarnishCli::connect(varnishd.admin_addr(), &secret, CliTimeouts::default())
        .await
        .context("cannot open the admin port")?;
    cli.vcl_inline(VCL_NAME, &vcl.text)
        .await
        .with_context(|| format!("varnishd refuses the rendered VCL:\n{}", vcl.text))?;
    cli.vcl_use(VCL_NAME).await.context("vcl.use")?;
    cli.start().await.context("cannot start the cache child")?;
    Ok(varnishd)
}

/// Returns an enabled backend of `director_id` in `dc_id` pointing at `origin`.
fn backend_at(id: i64, director_id: i64, dc_id: i64, origin: &HttpOrigin) -> Backend {
    let mut backend = fixtures::backend(id, director_id, dc_id, "127.0.0.1");
    backend.port = Some(u32::from(origin.addr().port()));
    backend
}

/// Sends `GET path` with `Host: host` through `varnishd` and returns the name of the origin that
/// answered; anything but a 200 from an origin is an error that shows the response.
async fn answered_by(varnishd: &Varnishd, host: &str, path: &str) -> Result<String> {
    let response = http_get(varnishd.http_addr(), path, host).await?;
    match (response.status, response.header("x-origin")) {
        (200, Some(origin)) => Ok(origin.to_owned()),
        _ => anyhow::bail!("GET {path} (Host: {host}) was not answered by an origin: {response:?}"),
    }
}

/// Sends `GET path` through `varnishd` and returns the response, which must be a synthetic one
/// (no origin answered it).
async fn synthetic(varnishd: &Varnishd, path: &str) -> Result<HttpResponse> {
    let response = http_get(varnishd.http_addr(), path, "example.com").await?;
    ensure!(
        response.header("x-origin").is_none(),
        "GET {path} reached an origin: {response:?}"
    );
    Ok(response)
}

#[tokio::test(flavor = "multi_thread")]
async fn host_routed_directors_are_tried_before_path_routed_ones() -> Result<()> {
    let www = HttpOrigin::start("www").await?;
    let api = HttpOrigin::start("api").await?;
    let mut snapshot = fixtures::empty_cluster();
    // The host-routed director has the higher id: only the router kind puts it first.
    let mut api_director = fixtures::director(30, "api", r"^api\.example\.com$");
    api_director.router = DirectorRouter::Domain as i32;
    snapshot.directors = vec![fixtures::director(20, "www", "^/"), api_director];
    snapshot.backends = vec![backend_at(40, 20, 1, &www), backend_at(41, 30, 1, &api)];
    let varnishd = serve(&snapshot, SERVER_ID).await?;

    assert_eq!(
        answered_by(&varnishd, "api.example.com", "/x").await?,
        "api"
    );
    assert_eq!(
        answered_by(&varnishd, "www.example.com", "/x").await?,
        "www"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn path_routed_directors_reach_their_own_origins() -> Result<()> {
    let a = HttpOrigin::start("a").await?;
    let b = HttpOrigin::start("b").await?;
    let mut snapshot = fixtures::empty_cluster();
    snapshot.directors = vec![
        fixtures::director(20, "a", "^/a/"),
        fixtures::director(21, "b", "^/b/"),
    ];
    snapshot.backends = vec![backend_at(40, 20, 1, &a), backend_at(41, 21, 1, &b)];
    let varnishd = serve(&snapshot, SERVER_ID).await?;

    assert_eq!(answered_by(&varnishd, "example.com", "/a/x").await?, "a");
    assert_eq!(answered_by(&varnishd, "example.com", "/b/x").await?, "b");
    // The expressions are anchored: "/a/" further down the path does not count.
    assert_eq!(answered_by(&varnishd, "example.com", "/b/a/x").await?, "b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_active_active_directors_fall_back_to_another_dc_when_their_own_is_sick() -> Result<()>
{
    // The dc-1 origin would answer any request, but fails its health checks: only the probe
    // keeps requests away from it.
    let own_dc = HttpOrigin::start_failing_health_checks("fra").await?;
    let other_dc = HttpOrigin::start("waw").await?;
    let mut snapshot = fixtures::empty_cluster();
    let mut probe = fixtures::probe(50, "health", "/health");
    probe.interval = Some(fixtures::millis(200));
    probe.timeout = Some(fixtures::millis(200));
    snapshot.probes = vec![probe];
    let mut everywhere = fixtures::director(20, "everywhere", "^/everywhere/");
    everywhere.active_active = Some(true);
    let mut local = fixtures::director(21, "local", "^/local/");
    local.active_active = Some(false);
    for director in [&mut everywhere, &mut local] {
        director.probe_id = 50;
    }
    snapshot.directors = vec![everywhere, local];
    snapshot.backends = vec![
        backend_at(40, 20, 1, &own_dc),
        backend_at(41, 20, 2, &other_dc),
        backend_at(42, 21, 1, &own_dc),
        backend_at(43, 21, 2, &other_dc),
    ];
    let varnishd = serve(&snapshot, SERVER_ID).await?;

    // Every backend starts sick; the dc-2 one turns healthy on its first probe. Each attempt
    // uses a new URL so that no cached answer hides the current health.
    let deadline = tokio::time::Instant::now() + HEALTHY_TIMEOUT;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let path = format!("/everywhere/{attempt}");
        let response = http_get(varnishd.http_addr(), &path, "example.com").await?;
        if response.status == 200 {
            assert_eq!(response.header("x-origin"), Some("waw"), "{response:?}");
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the active_active director never reached dc 2: {response:?}\n{}",
            varnishd.varnishadm(&["backend.list", "-p"]).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The probes have run: a dc-2 backend of the other director would be healthy too, but it
    // is not even declared, and its only backend is sick. (backend.list also lists the
    // directors-vmod objects, `local_fra_1`; backend names end with address and port.)
    let backends = varnishd.varnishadm(&["backend.list"]).await?;
    let local_backends: Vec<&str> = backends
        .lines()
        .filter(|line| line.starts_with(&format!("{VCL_NAME}.local_")))
        .filter(|line| line.contains("_127_0_0_1_"))
        .collect();
    assert!(
        local_backends.len() == 1 && local_backends[0].contains("_fra_1_"),
        "{backends}"
    );
    let response = synthetic(&varnishd, "/local/1").await?;
    assert_eq!(response.status, 503, "{response:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_server_is_answered_only_by_canary_backends() -> Result<()> {
    let regular = HttpOrigin::start("regular").await?;
    let canary = HttpOrigin::start("canary").await?;
    let assets = HttpOrigin::start("assets").await?;
    let mut snapshot = fixtures::empty_cluster();
    let canary_server_id = SERVER_ID + 1;
    snapshot.servers.push(VarnishServer {
        id: canary_server_id,
        hostname: "cache-canary".into(),
        is_canary: true,
        ..snapshot.servers[0].clone()
    });
    // A random director honours weights, so weight 0 keeps the canary backend off the regular
    // server while the canary server (which raises it to 1) uses nothing else.
    let mut api = fixtures::director(20, "api", "^/api/");
    api.mode = DirectorMode::Random as i32;
    snapshot.directors = vec![api, fixtures::director(21, "assets", "^/assets/")];
    let mut canary_backend = backend_at(41, 20, 1, &canary);
    canary_backend.tags = vec!["canary".into()];
    canary_backend.weight = Some(0);
    snapshot.backends = vec![
        backend_at(40, 20, 1, &regular),
        canary_backend,
        backend_at(42, 21, 1, &assets),
    ];
    let (regular_server, canary_server) = tokio::try_join!(
        serve(&snapshot, SERVER_ID),
        serve(&snapshot, canary_server_id)
    )?;

    // New URLs every time: a cache hit would repeat the first answer.
    for attempt in 0..10 {
        let path = format!("/api/{attempt}");
        assert_eq!(
            answered_by(&canary_server, "example.com", &path).await?,
            "canary",
            "canary server, {path}"
        );
        assert_eq!(
            answered_by(&regular_server, "example.com", &path).await?,
            "regular",
            "regular server, {path}"
        );
    }
    // A director without canary backends serves the canary server as any other.
    assert_eq!(
        answered_by(&canary_server, "example.com", "/assets/x").await?,
        "assets"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_director_without_usable_backends_and_an_unmatched_request_get_a_404_that_says_why()
-> Result<()> {
    let retired_origin = HttpOrigin::start("retired").await?;
    let mut snapshot = fixtures::empty_cluster();
    snapshot.directors = vec![
        fixtures::director(20, "empty", "^/empty/"),
        fixtures::director(21, "retired", "^/retired/"),
    ];
    let mut disabled = backend_at(40, 21, 1, &retired_origin);
    disabled.enabled = Some(false);
    snapshot.backends = vec![disabled];
    let varnishd = serve(&snapshot, SERVER_ID).await?;

    for (path, reason) in [
        ("/empty/x", "director empty has no backends"),
        ("/retired/x", "director retired has no backends"),
        ("/elsewhere", "no director matches the request"),
    ] {
        let response = synthetic(&varnishd, path).await?;
        assert_eq!(
            (response.status, response.body.as_str()),
            (404, reason),
            "{path}: {response:?}"
        );
    }
    assert_eq!(retired_origin.requests(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_path_strips_the_matched_prefix_from_the_url_the_origin_sees() -> Result<()> {
    let origin = HttpOrigin::start("api").await?;
    let mut snapshot = fixtures::empty_cluster();
    // The origin echoes X-Trail as X-Echo-Trail: the template hands it the URL varnishd sends.
    snapshot.templates[0].content =
        "<VCL/>\n\nsub vcl_backend_fetch {\n    set bereq.http.X-Trail = bereq.url;\n}\n".into();
    let mut api = fixtures::director(20, "api", "^/api/");
    api.remove_path = true;
    snapshot.directors = vec![api, fixtures::director(21, "keep", "^/keep/")];
    snapshot.backends = vec![
        backend_at(40, 20, 1, &origin),
        backend_at(41, 21, 1, &origin),
    ];
    let varnishd = serve(&snapshot, SERVER_ID).await?;

    for (path, seen_by_origin) in [
        ("/api/x", "/x"),
        ("/api/deep/path?q=1", "/deep/path?q=1"),
        ("/keep/x", "/keep/x"),
    ] {
        let response = http_get(varnishd.http_addr(), path, "example.com").await?;
        assert_eq!(response.status, 200, "{path}: {response:?}");
        assert_eq!(
            response.header("x-echo-trail"),
            Some(seen_by_origin),
            "{path}: {response:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn virtual_directors_are_never_routed() -> Result<()> {
    let hidden = HttpOrigin::start("hidden").await?;
    let public = HttpOrigin::start("public").await?;
    let mut snapshot = fixtures::empty_cluster();
    // The virtual director has the lower id and matches every request below.
    let mut virtual_director = fixtures::director(20, "hidden", "^/v/");
    virtual_director.r#virtual = true;
    snapshot.directors = vec![
        virtual_director,
        fixtures::director(21, "public", "^/v/public/"),
    ];
    snapshot.backends = vec![
        backend_at(40, 20, 1, &hidden),
        backend_at(41, 21, 1, &public),
    ];
    let varnishd = serve(&snapshot, SERVER_ID).await?;

    assert_eq!(
        answered_by(&varnishd, "example.com", "/v/public/x").await?,
        "public"
    );
    let response = synthetic(&varnishd, "/v/other").await?;
    assert_eq!(
        (response.status, response.body.as_str()),
        (404, "no director matches the request"),
        "{response:?}"
    );
    assert_eq!(hidden.requests(), 0);
    Ok(())
}

/// One request of the redirect test and what a client must get: the status, and the Location
/// of a redirect (`None`: no redirect; the origin's 200 or the router's 404).
struct Expected {
    host: &'static str,
    url: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    location: Option<&'static str>,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_redirect_kind_answers_in_varnishd_as_the_rust_router_predicts() -> Result<()> {
    let origin = HttpOrigin::start("origin").await?;
    let mut snapshot = fixtures::redirects();
    snapshot.backends = vec![
        backend_at(30, 20, 1, &origin),
        backend_at(31, 21, 1, &origin),
    ];
    let varnishd = serve(&snapshot, SERVER_ID).await?;
    let table = vaas_vcl::routing::RoutingTable::build(&snapshot)?;
    let cases = [
        // Static mapping: groups rewritten into the destination.
        Expected {
            host: "example.com",
            url: "/old/a/b",
            headers: &[],
            status: 301,
            location: Some("https://new.example.com/a/b"),
        },
        // Any case of a mapped host; the query string kept, after "&" (the destination has a "?").
        Expected {
            host: "WWW.Example.com",
            url: "/promo?x=1",
            headers: &[],
            status: 302,
            location: Some("/sale?src=promo&x=1"),
        },
        Expected {
            host: "example.com",
            url: "/promo",
            headers: &[],
            status: 302,
            location: Some("/sale?src=promo"),
        },
        // The required header: with it a 307, without it no redirect (and no director: a 404).
        Expected {
            host: "example.com",
            url: "/any",
            headers: &[("X-Beta", "yes")],
            status: 307,
            location: Some("/beta"),
        },
        Expected {
            host: "example.com",
            url: "/any",
            headers: &[],
            status: 404,
            location: None,
        },
        // static_regex mapping, 308, the query kept after "?".
        Expected {
            host: "blog.example.org",
            url: "/p?q=2",
            headers: &[],
            status: 308,
            location: Some("https://example.com/?q=2"),
        },
        // Dynamic mapping filled from the cluster's label env:prod.
        Expected {
            host: "shop.prod.example.net",
            url: "/cart",
            headers: &[],
            status: 301,
            location: Some("https://shop.example.net/cart"),
        },
        Expected {
            host: "shop.test.example.net",
            url: "/cart",
            headers: &[],
            status: 404,
            location: None,
        },
        // A dynamic mapping whose label the cluster lacks stands for no host.
        Expected {
            host: "eu.example.net",
            url: "/",
            headers: &[],
            status: 404,
            location: None,
        },
        // The HTTPS-only director: plain HTTP is redirected, HTTPS (from the terminator) served.
        Expected {
            host: "example.net",
            url: "/secure/x?a=1",
            headers: &[],
            status: 301,
            location: Some("https://example.net/secure/x?a=1"),
        },
        Expected {
            host: "example.net",
            url: "/secure/x",
            headers: &[("X-Forwarded-Proto", "https")],
            status: 200,
            location: None,
        },
        Expected {
            host: "example.net",
            url: "/api/x",
            headers: &[],
            status: 200,
            location: None,
        },
    ];
    for case in cases {
        let response = vaas_testkit::http_request(
            varnishd.http_addr(),
            "GET",
            case.url,
            case.host,
            case.headers,
        )
        .await?;
        let what = format!("GET {} (Host: {}, {:?})", case.url, case.host, case.headers);
        assert_eq!(response.status, case.status, "{what}: {response:?}");
        assert_eq!(
            response.header("location"),
            case.location,
            "{what}: {response:?}"
        );
        let predicted = table.decide(&vaas_vcl::routing::Request {
            url: case.url.into(),
            host: case.host.into(),
            headers: case
                .headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            canary_random: 0,
        });
        let predicted_location = predicted.redirect.as_ref().map(|r| r.location.as_str());
        assert_eq!(
            predicted_location, case.location,
            "{what}: predicted {predicted:?}"
        );
        if let Some(redirect) = &predicted.redirect {
            assert_eq!(u32::from(case.status), redirect.status, "{what}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_written_for_the_original_choose_directors_with_its_tags() -> Result<()> {
    let api = HttpOrigin::start("api").await?;
    let hidden = HttpOrigin::start("hidden").await?;
    let www = HttpOrigin::start("www").await?;
    let mut snapshot = fixtures::director_tags();
    snapshot.backends = vec![
        backend_at(30, 20, 1, &api),
        backend_at(31, 21, 1, &www),
        backend_at(32, 23, 1, &hidden),
    ];
    let varnishd = serve(&snapshot, SERVER_ID).await?;
    // USE_DIRECTOR_API in the template's own vcl_recv, before any route.
    assert_eq!(
        answered_by(&varnishd, "example.com", "/use/x").await?,
        "api"
    );
    // SET_BACKEND_HIDDEN chooses the virtual director the router never routes to.
    let response = vaas_testkit::http_request(
        varnishd.http_addr(),
        "GET",
        "/anything.css",
        "other.example",
        &[("X-Hidden", "1")],
    )
    .await?;
    assert_eq!(response.header("x-origin"), Some("hidden"), "{response:?}");
    // SET_BACKEND_EMPTY answers the director's 404.
    let empty = synthetic(&varnishd, "/empty-tag/x").await?;
    assert_eq!(
        (empty.status, empty.body.as_str()),
        (404, "director empty has no backends")
    );
    // FLEXIBLE_ROUTER and ROUTER still route: route 40 by header and URL to www.
    let routed = vaas_testkit::http_request(
        varnishd.http_addr(),
        "GET",
        "/api/v2/users",
        "other.example",
        &[("X-Beta", "1")],
    )
    .await?;
    assert_eq!(routed.header("x-origin"), Some("www"), "{routed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_canary_random_number_splits_traffic_and_a_client_cannot_choose_it() -> Result<()> {
    use vaas_proto::v1::{RouteLeft, RouteOperator};
    let canary = HttpOrigin::start("canary").await?;
    let stable = HttpOrigin::start("stable").await?;
    let mut snapshot = fixtures::empty_cluster();
    snapshot.directors = vec![
        fixtures::director(20, "stable", "^/"),
        fixtures::director(21, "canary", "^/never/"),
    ];
    snapshot.backends = vec![
        backend_at(30, 20, 1, &stable),
        backend_at(31, 21, 1, &canary),
    ];
    let canary_route = |id, prefix: &str, below: &str| {
        fixtures::route(
            id,
            1,
            21,
            vec![
                fixtures::condition(RouteLeft::Url, "", RouteOperator::Matches, prefix),
                fixtures::condition(RouteLeft::CanaryRandom, "", RouteOperator::Less, below),
            ],
        )
    };
    snapshot.routes = vec![
        canary_route(40, "^/half/", "50"),
        canary_route(41, "^/rare/", "1"),
    ];
    let varnishd = serve(&snapshot, SERVER_ID).await?;
    let mut half = 0;
    let mut rare = 0;
    for n in 0..200 {
        if answered_by(&varnishd, "example.com", &format!("/half/{n}")).await? == "canary" {
            half += 1;
        }
        // A client sending the number it wants is overwritten by the drawn one.
        let forged = vaas_testkit::http_request(
            varnishd.http_addr(),
            "GET",
            &format!("/rare/{n}"),
            "example.com",
            &[("X-VaaS-Canary-Random", "0")],
        )
        .await?;
        if forged.header("x-origin") == Some("canary") {
            rare += 1;
        }
    }
    // Binomial(200, 0.5) lies within 50..150 but for one run in about 10^12.
    assert!(
        (50..150).contains(&half),
        "{half}/200 requests below 50 went to the canary"
    );
    // Binomial(200, 0.01): at least 20 happens about once in 10^13 runs; forging would give 200.
    assert!(rare < 20, "{rare}/200 forged requests went to the canary");
    Ok(())
}
