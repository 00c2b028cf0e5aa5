//! End-to-end: routes through the gRPC API on both stores, served by a real varnishd — a route
//! takes its requests before the directors' expressions, by priority; a pass route never caches
//! and a pipe route hands the connection to the backend; and a change that would send a route's
//! positive URL to another director is refused, naming the route and the URL, with nothing saved.

use anyhow::{Context, Result, ensure};
use tonic::Code;
use vaas_proto::v1::{
    CreateBackendRequest, CreateRouteRequest, DeleteDirectorRequest, Director, GetRouteRequest,
    ListRoutesRequest, Route, RouteAction, RouteLeft, RouteOperator, TaskState,
    UpdateDirectorRequest, UpdateRouteRequest,
};
use vaas_testkit::{HttpOrigin, HttpResponse, http_get};
use vaas_tests::{
    StoreKind, System, assert_invalid_argument, backend_for, on_both_stores, route_condition,
};

on_both_stores!(
    a_route_takes_its_requests_by_priority_passes_or_pipes_them,
    a_change_that_breaks_a_positive_url_is_refused_and_saves_nothing,
);

/// The host every request of these tests is sent with.
const HOST: &str = "demo.example";

/// The positive URL of the beta route.
const BETA_URL: &str = "http://demo.example/app/x";

/// A route of `priority` for URLs under /app/ on [`HOST`], to `director_id`, applying to the
/// director's clusters.
fn app_route(priority: u32, director_id: i64, url_expression: &str) -> Route {
    Route {
        conditions: vec![
            route_condition(RouteLeft::Url, "", RouteOperator::Matches, url_expression),
            route_condition(RouteLeft::Host, "", RouteOperator::Equal, HOST),
        ],
        priority,
        clusters_in_sync: true,
        director_id,
        action: RouteAction::Pass as i32,
        ..Default::default()
    }
}

/// Creates `route` synchronously; fails unless its reload succeeded.
async fn create_route(system: &System, route: Route) -> Result<Route> {
    let created = system
        .config()
        .create_route(CreateRouteRequest { route: Some(route) })
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
    created.route.context("route")
}

async fn get(system: &System, path: &str) -> Result<HttpResponse> {
    http_get(system.varnishd(0).http_addr(), path, HOST).await
}

async fn a_route_takes_its_requests_by_priority_passes_or_pipes_them(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let main = HttpOrigin::start("main").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, main.addr())),
        })
        .await?;
    let beta_origin = HttpOrigin::start("beta").await?;
    let (beta, _) = system
        .create_director_with_backend(&setup, "beta", "^/never/", beta_origin.addr())
        .await?;
    let mut route = app_route(10, beta.id, "^/app/");
    route.positive_urls = vec![BETA_URL.into()];
    let route = create_route(&system, route).await?;

    // The route comes before the "demo" director's "^/", and passes: never cached.
    for _ in 0..2 {
        let response = get(&system, "/app/x").await?;
        assert_eq!(response.header("x-origin"), Some("beta"), "{response:?}");
        assert!(response.header("x-vaas-vcl-version").is_some());
    }
    assert_eq!(beta_origin.requests(), 2, "a pass route never caches");
    // Another host is not the route's: the director's expression takes it, and it is cached.
    for _ in 0..2 {
        let response = http_get(system.varnishd(0).http_addr(), "/app/x", "other.example").await?;
        assert_eq!(response.header("x-origin"), Some("main"), "{response:?}");
    }
    assert_eq!(main.requests(), 1, "the director's requests are cached");

    // A route of a lower priority number comes first.
    create_route(&system, app_route(5, setup.director_id, "^/app/special")).await?;
    let special = get(&system, "/app/special").await?;
    assert_eq!(special.header("x-origin"), Some("main"), "{special:?}");
    let still_beta = get(&system, "/app/y").await?;
    assert_eq!(
        still_beta.header("x-origin"),
        Some("beta"),
        "{still_beta:?}"
    );

    // Piped: varnishd hands the connection over and never runs vcl_deliver on the answer.
    let piped = system
        .config()
        .update_route(UpdateRouteRequest {
            route: Some(Route {
                action: RouteAction::Pipe as i32,
                ..route
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["action".into()],
            }),
        })
        .await?
        .into_inner();
    assert_eq!(piped.tasks[0].state, TaskState::Success as i32);
    let response = get(&system, "/app/z").await?;
    assert_eq!(response.header("x-origin"), Some("beta"), "{response:?}");
    assert_eq!(response.header("x-vaas-vcl-version"), None, "{response:?}");
    system.ensure_running()
}

async fn a_change_that_breaks_a_positive_url_is_refused_and_saves_nothing(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let beta_origin = HttpOrigin::start("beta").await?;
    let (beta, _) = system
        .create_director_with_backend(&setup, "beta", "^/never/", beta_origin.addr())
        .await?;
    let mut route = app_route(10, beta.id, "^/app/");
    route.positive_urls = vec![BETA_URL.into()];
    let route = create_route(&system, route).await?;
    let route_name = format!("route {}", route.id);

    // The route's own condition no longer matching its URL.
    let narrowed = system
        .config()
        .update_route(UpdateRouteRequest {
            route: Some(Route {
                conditions: vec![route_condition(
                    RouteLeft::Url,
                    "",
                    RouteOperator::Matches,
                    "^/application/",
                )],
                ..route.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["conditions".into()],
            }),
        })
        .await
        .expect_err("the positive URL no longer matches");
    assert_invalid_argument(&narrowed, "route", &[&route_name, BETA_URL]);

    // A new route of an earlier priority that takes the URL to another director.
    let shadowing = system
        .config()
        .create_route(CreateRouteRequest {
            route: Some(app_route(1, setup.director_id, "^/")),
        })
        .await
        .expect_err("the new route takes the positive URL");
    assert_invalid_argument(
        &shadowing,
        "route",
        &[&route_name, BETA_URL, "director demo"],
    );

    // The director turned virtual, or deleted, while the route chooses it.
    let made_virtual = system
        .config()
        .update_director(UpdateDirectorRequest {
            director: Some(Director {
                r#virtual: true,
                ..beta.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["virtual".into()],
            }),
        })
        .await
        .expect_err("a routed-to director cannot become virtual");
    assert_invalid_argument(&made_virtual, "director.virtual", &[&route_name]);
    let deleted = system
        .config()
        .delete_director(DeleteDirectorRequest { id: beta.id })
        .await
        .expect_err("a director with routes cannot be deleted");
    assert_eq!(deleted.code(), Code::FailedPrecondition, "{deleted:?}");

    // Nothing of the refused changes was saved, and varnishd still routes as before.
    let stored = system
        .config()
        .get_route(GetRouteRequest { id: route.id })
        .await?
        .into_inner()
        .route
        .context("route")?;
    assert_eq!(stored, route);
    let listed = system
        .config()
        .list_routes(ListRoutesRequest {
            cluster_id: setup.cluster_id,
            ..Default::default()
        })
        .await?
        .into_inner()
        .routes;
    assert_eq!(listed, [route]);
    assert!(!system.director(beta.id).await?.r#virtual);
    let response = get(&system, "/app/x").await?;
    assert_eq!(response.header("x-origin"), Some("beta"), "{response:?}");
    system.ensure_running()
}
