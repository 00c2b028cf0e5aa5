//! Rendering benchmark: one server's VCL for a cluster of 5,000 backends in 500 directors with
//! 1,000 routes and 100 redirects (the reload-speed target is under 20 ms), next to the floor
//! measured in the same run: copying and hashing a text of the same size, which any renderer
//! that writes the VCL and its version must do.
//!
//! `cargo bench -p vaas-vcl --bench render` (release build). `VAAS_BENCH_ROUNDS` (default 30)
//! sets the number of timed renders.

use std::hint::black_box;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vaas_proto::v1::{
    Backend, Cluster, ClusterSnapshot, Dc, Director, DirectorRouter, DomainMapping,
    DomainMappingType, Redirect, Route, RouteAction, RouteCondition, RouteLeft, RouteOperator,
    ServerStatus, VarnishServer, VclTemplate,
};

const DIRECTORS: i64 = 500;
const BACKENDS_PER_DIRECTOR: i64 = 10;
const ROUTES: i64 = 1_000;
const REDIRECTS: i64 = 100;
const SERVER_ID: i64 = 1;

fn snapshot() -> ClusterSnapshot {
    let dcs = vec![
        Dc {
            id: 1,
            name: "one".into(),
            symbol: "dc1".into(),
        },
        Dc {
            id: 2,
            name: "two".into(),
            symbol: "dc2".into(),
        },
    ];
    let directors: Vec<Director> = (1..=DIRECTORS)
        .map(|id| Director {
            id,
            name: format!("service_{id}"),
            cluster_ids: vec![1],
            router: DirectorRouter::Path as i32,
            route_expression: format!("^/service-{id}/"),
            ..Default::default()
        })
        .collect();
    let backends: Vec<Backend> = (1..=DIRECTORS)
        .flat_map(|director| {
            (0..BACKENDS_PER_DIRECTOR).map(move |n| {
                let id = director * 100 + n;
                Backend {
                    id,
                    director_id: director,
                    dc_id: 1 + n % 2,
                    address: format!("10.{}.{}.{}", director / 250, director % 250, n + 1),
                    port: Some(8080),
                    ..Default::default()
                }
            })
        })
        .collect();
    let routes: Vec<Route> = (1..=ROUTES)
        .map(|id| Route {
            id,
            conditions: vec![
                RouteCondition {
                    left: RouteLeft::Url as i32,
                    operator: RouteOperator::Matches as i32,
                    value: format!("^/route-{id}/"),
                    ..Default::default()
                },
                RouteCondition {
                    left: RouteLeft::Header as i32,
                    header: "X-Team".into(),
                    operator: RouteOperator::Equal as i32,
                    value: format!("team-{}", id % 17),
                },
            ],
            priority: (id % 500 + 1) as u32,
            clusters_in_sync: true,
            director_id: id % DIRECTORS + 1,
            action: RouteAction::Pass as i32,
            ..Default::default()
        })
        .collect();
    let domain_mappings: Vec<DomainMapping> = (1..=10)
        .map(|id| DomainMapping {
            id,
            domain: format!("site-{id}.example.com"),
            mappings: vec![
                format!("site-{id}.example.com"),
                format!("www.site-{id}.example.com"),
            ],
            r#type: DomainMappingType::Static as i32,
            cluster_ids: vec![1],
            ..Default::default()
        })
        .collect();
    let redirects: Vec<Redirect> = (1..=REDIRECTS)
        .map(|id| Redirect {
            id,
            source_domain_id: id % 10 + 1,
            condition: format!("^/old-{id}/(.*)$"),
            rewrite_groups: true,
            destination: format!("https://new.example.com/{id}/\\1"),
            status: 301,
            priority: id as u32,
            ..Default::default()
        })
        .collect();
    ClusterSnapshot {
        version: 1,
        cluster: Some(Cluster {
            id: 1,
            name: "big".into(),
            ..Default::default()
        }),
        servers: vec![VarnishServer {
            id: SERVER_ID,
            address: "127.0.0.1".into(),
            status: ServerStatus::Active as i32,
            dc_id: 1,
            template_id: 1,
            cluster_id: 1,
            ..Default::default()
        }],
        dcs,
        templates: vec![VclTemplate {
            id: 1,
            name: "default".into(),
            content: "<VCL/>".into(),
            ..Default::default()
        }],
        directors,
        backends,
        routes,
        domain_mappings,
        redirects,
        ..Default::default()
    }
}

/// Returns the p50 and the minimum of `rounds` timings of `work`.
fn time(rounds: usize, mut work: impl FnMut()) -> (Duration, Duration) {
    let mut timings: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed()
        })
        .collect();
    timings.sort();
    (timings[timings.len() / 2], timings[0])
}

fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

fn main() {
    let rounds: usize = std::env::var("VAAS_BENCH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(30);
    let snapshot = snapshot();
    let vcl = vaas_vcl::render(&snapshot, SERVER_ID).expect("the benchmark snapshot renders");
    let bytes = vcl.text.len();
    let (render_p50, render_min) = time(rounds, || {
        black_box(vaas_vcl::render(black_box(&snapshot), SERVER_ID).expect("renders"));
    });
    let options = vaas_vcl::SplitOptions::default();
    let (split_p50, split_min) = time(rounds, || {
        black_box(
            vaas_vcl::render_split(black_box(&snapshot), SERVER_ID, options)
                .expect("renders")
                .expect("splits"),
        );
    });
    let (floor_p50, floor_min) = time(rounds, || {
        let copy = black_box(&vcl.text).clone();
        black_box(Sha256::digest(copy.as_bytes()));
    });
    println!(
        "render: {DIRECTORS} directors, {} backends, {ROUTES} routes, {REDIRECTS} redirects -> {:.1} MiB of VCL",
        DIRECTORS * BACKENDS_PER_DIRECTOR,
        bytes as f64 / (1024.0 * 1024.0)
    );
    println!("| | p50 | min |");
    println!("|---|---|---|");
    println!(
        "| render (target < 20 ms) | {} | {} |",
        millis(render_p50),
        millis(render_min)
    );
    println!(
        "| split render: top, {} shards and the version VCL | {} | {} |",
        options.shards,
        millis(split_p50),
        millis(split_min)
    );
    println!(
        "| floor: copy + SHA-256 of the text | {} | {} |",
        millis(floor_p50),
        millis(floor_min)
    );
    println!("({rounds} rounds each)");
}
