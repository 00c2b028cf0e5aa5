//! End-to-end: StatusService.Explain on both stores, checked against a real varnishd. Explain
//! names the director a request goes to, the route that took it and the backends (as stored) in
//! the server's datacenter, or the synthetic 404 varnishd answers itself; the version it names
//! is the one the server runs after a synchronous write; and varnishd, asked the same request,
//! does what Explain said. Bad requests are refused by field, unknown servers are NOT_FOUND and
//! disabled ones FAILED_PRECONDITION.

use anyhow::{Context, Result, ensure};
use tonic::Code;
use vaas_proto::v1::{
    Backend, CreateBackendRequest, CreateRouteRequest, CreateVarnishServerRequest, Director,
    ExplainHeader, ExplainRequest, ExplainResponse, ExplainedBackendGroup, Route, RouteAction,
    RouteLeft, RouteOperator, ServerStatus, TaskState, UpdateDirectorRequest,
};
use vaas_testkit::{HttpOrigin, http_get, http_request};
use vaas_tests::{
    Setup, StoreKind, System, backend_for, on_both_stores, route_condition, silent_server,
    violated_fields,
};

on_both_stores!(
    explain_names_the_route_director_and_backends_that_varnishd_then_uses,
    explain_refuses_bad_requests_by_field_and_servers_that_run_no_vcl,
);

/// The host every request of these tests is sent with.
const HOST: &str = "demo.example";

/// The header the beta route needs, and its value.
const TEAM_HEADER: (&str, &str) = ("X-Team", "blue");

/// Asks Explain what the set-up server does with `GET http://HOST{path}` and `headers`.
async fn explain(
    system: &System,
    setup: &Setup,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<ExplainResponse> {
    let request = ExplainRequest {
        server_id: setup.server_id,
        url: format!("http://{HOST}{path}"),
        headers: headers
            .iter()
            .map(|(name, value)| ExplainHeader {
                name: (*name).into(),
                value: (*value).into(),
            })
            .collect(),
        canary_random: None,
    };
    Ok(system.status().explain(request).await?.into_inner())
}

/// Sends the request to the set-up varnishd and checks that it does what `explained` says: the
/// chosen director's origin answers (each origin is named like its director) through the
/// explained VCL version, or varnishd answers the explained synthetic status and reason itself.
async fn assert_varnishd_agrees(
    system: &System,
    explained: &ExplainResponse,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<()> {
    let response = http_request(system.varnishd(0).http_addr(), "GET", path, HOST, headers).await?;
    assert_eq!(
        response.header("x-vaas-vcl-version"),
        Some(explained.vcl_version.as_str()),
        "{path}: {response:?}"
    );
    if explained.synthetic_status == 0 {
        assert_eq!(response.status, 200, "{path}: {response:?}");
        assert_eq!(
            response.header("x-origin"),
            Some(explained.director.as_str()),
            "{path}: {response:?}"
        );
    } else {
        assert_eq!(
            (u32::from(response.status), response.body.as_str()),
            (
                explained.synthetic_status,
                explained.synthetic_reason.as_str()
            ),
            "{path}: {response:?}"
        );
        assert_eq!(response.header("x-origin"), None, "{path}: {response:?}");
    }
    Ok(())
}

/// Creates `backend` synchronously and returns it as stored.
async fn create_backend(system: &System, backend: Backend) -> Result<Backend> {
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend),
        })
        .await?
        .into_inner()
        .backend
        .context("backend")
}

async fn explain_names_the_route_director_and_backends_that_varnishd_then_uses(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;

    // The "demo" director (route expression "^/") takes every path, but has no backend yet.
    let empty = explain(&system, &setup, "/hello", &[]).await?;
    assert_eq!(
        (empty.director_id, empty.director.as_str()),
        (setup.director_id, "demo")
    );
    assert!(empty.backend_groups.is_empty(), "{empty:?}");
    assert_eq!(
        (empty.synthetic_status, empty.synthetic_reason.as_str()),
        (404, "director demo has no backends")
    );
    assert!(
        empty.running,
        "the director's write answered once it ran: {empty:?}"
    );
    assert_varnishd_agrees(&system, &empty, "/hello", &[]).await?;

    // With a backend: the director, that backend in the server's datacenter, from the origin.
    let demo_origin = HttpOrigin::start("demo").await?;
    let demo_backend = create_backend(&system, backend_for(&setup, demo_origin.addr())).await?;
    let served = explain(&system, &setup, "/hello", &[]).await?;
    assert_eq!(served.route_id, 0, "no route: {served:?}");
    assert_eq!(served.action, RouteAction::Unspecified as i32);
    assert_eq!(
        (served.director_id, served.director.as_str()),
        (setup.director_id, "demo")
    );
    assert_eq!(
        served.backend_groups,
        [ExplainedBackendGroup {
            dc_id: setup.dc_id,
            backends: vec![demo_backend.clone()],
        }]
    );
    assert_eq!(
        (demo_backend.address, demo_backend.port),
        (
            demo_origin.addr().ip().to_string(),
            Some(u32::from(demo_origin.addr().port()))
        ),
        "the backend Explain names is the origin's"
    );
    assert_eq!(
        (served.synthetic_status, served.synthetic_reason.as_str()),
        (0, "")
    );
    assert_ne!(served.vcl_version, empty.vcl_version, "a new configuration");
    assert!(served.running, "the backend's write answered once it ran");
    let running = system.server(setup.server_id).await?.running_vcl_version;
    assert_eq!(running, served.vcl_version);
    assert_varnishd_agrees(&system, &served, "/hello", &[]).await?;
    assert!(
        demo_origin.requests() >= 1,
        "the request reached the origin"
    );

    // A pass route to a second director, for /app/ on HOST with the team header.
    let beta_origin = HttpOrigin::start("beta").await?;
    let (beta, beta_backend) = system
        .create_director_with_backend(&setup, "beta", "^/never/", beta_origin.addr())
        .await?;
    let created = system
        .config()
        .create_route(CreateRouteRequest {
            route: Some(Route {
                conditions: vec![
                    route_condition(RouteLeft::Url, "", RouteOperator::Matches, "^/app/"),
                    route_condition(RouteLeft::Host, "", RouteOperator::Equal, HOST),
                    route_condition(
                        RouteLeft::Header,
                        TEAM_HEADER.0,
                        RouteOperator::Equal,
                        TEAM_HEADER.1,
                    ),
                ],
                priority: 10,
                clusters_in_sync: true,
                director_id: beta.id,
                action: RouteAction::Pass as i32,
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    ensure!(
        created
            .tasks
            .iter()
            .all(|task| task.state == TaskState::Success as i32),
        "the route's reload succeeds before the write answers: {:?}",
        created.tasks
    );
    let route = created.route.context("route")?;

    let routed = explain(&system, &setup, "/app/x", &[TEAM_HEADER]).await?;
    assert_eq!(routed.route_id, route.id, "{routed:?}");
    assert_eq!(routed.action, RouteAction::Pass as i32);
    assert_eq!(
        (routed.director_id, routed.director.as_str()),
        (beta.id, "beta")
    );
    assert_eq!(
        routed.backend_groups,
        [ExplainedBackendGroup {
            dc_id: setup.dc_id,
            backends: vec![beta_backend],
        }]
    );
    assert!(routed.running, "the route's write answered once it ran");
    let beta_before = beta_origin.requests();
    assert_varnishd_agrees(&system, &routed, "/app/x", &[TEAM_HEADER]).await?;
    assert_eq!(
        beta_origin.requests(),
        beta_before + 1,
        "a pass reaches the origin"
    );
    // Without the header the route does not hold: the demo director's expression takes it.
    let unrouted = explain(&system, &setup, "/app/x", &[]).await?;
    assert_eq!(
        (unrouted.route_id, unrouted.director.as_str()),
        (0, "demo"),
        "{unrouted:?}"
    );
    assert_varnishd_agrees(&system, &unrouted, "/app/x", &[]).await?;

    // Narrowed to /shop/, the demo director leaves other paths to nobody: a synthetic 404.
    system
        .config()
        .update_director(UpdateDirectorRequest {
            director: Some(Director {
                id: setup.director_id,
                route_expression: "^/shop/".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["route_expression".into()],
            }),
        })
        .await?;
    let unmatched = explain(&system, &setup, "/elsewhere", &[]).await?;
    assert_eq!(
        (
            unmatched.route_id,
            unmatched.director_id,
            unmatched.director.as_str()
        ),
        (0, 0, ""),
        "{unmatched:?}"
    );
    assert!(unmatched.backend_groups.is_empty(), "{unmatched:?}");
    assert_eq!(
        (
            unmatched.synthetic_status,
            unmatched.synthetic_reason.as_str()
        ),
        (404, "no director matches the request")
    );
    assert!(unmatched.running);
    assert_varnishd_agrees(&system, &unmatched, "/elsewhere", &[]).await?;
    let shop = explain(&system, &setup, "/shop/cart", &[]).await?;
    assert_eq!(shop.director.as_str(), "demo", "{shop:?}");
    assert_varnishd_agrees(&system, &shop, "/shop/cart", &[]).await?;
    let version = http_get(system.varnishd(0).http_addr(), "/vaas_version", HOST).await?;
    assert_eq!(version.body.trim(), shop.vcl_version, "the server runs it");
    system.ensure_running()
}

async fn explain_refuses_bad_requests_by_field_and_servers_that_run_no_vcl(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let valid = ExplainRequest {
        server_id: setup.server_id,
        url: format!("http://{HOST}/"),
        ..Default::default()
    };
    let mut status = system.status();

    let relative = status
        .explain(ExplainRequest {
            url: "/relative".into(),
            ..valid.clone()
        })
        .await
        .expect_err("a relative url is refused");
    assert_eq!(relative.code(), Code::InvalidArgument, "{relative:?}");
    assert_eq!(violated_fields(&relative), ["url"], "{relative:?}");
    assert!(
        relative.message().contains("http://"),
        "{}",
        relative.message()
    );

    let spaced = status
        .explain(ExplainRequest {
            headers: vec![ExplainHeader {
                name: "X Team".into(),
                value: "blue".into(),
            }],
            ..valid.clone()
        })
        .await
        .expect_err("a header name with a space is refused");
    assert_eq!(spaced.code(), Code::InvalidArgument, "{spaced:?}");
    assert_eq!(violated_fields(&spaced), ["headers[0].name"], "{spaced:?}");

    let unknown = status
        .explain(ExplainRequest {
            server_id: setup.server_id + 1000,
            ..valid.clone()
        })
        .await
        .expect_err("an unknown server is refused");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    let disabled = system
        .config()
        .create_varnish_server(CreateVarnishServerRequest {
            varnish_server: Some(vaas_proto::v1::VarnishServer {
                status: ServerStatus::Disabled as i32,
                ..silent_server(&setup)
            }),
        })
        .await?
        .into_inner()
        .varnish_server
        .context("server")?;
    let refused = status
        .explain(ExplainRequest {
            server_id: disabled.id,
            ..valid.clone()
        })
        .await
        .expect_err("a disabled server runs no VCL");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!("server {} is disabled and runs no VCL", disabled.id)
    );

    // The valid request is answered.
    let answered = status.explain(valid).await?.into_inner();
    assert_eq!(answered.director.as_str(), "demo", "{answered:?}");
    system.ensure_running()
}
