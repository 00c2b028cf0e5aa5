//! Incremental reload benchmark: one backend change in a large cluster, through VaaS, with the
//! split VCL (the agent's default from 1,000 backends: a top VCL and 32 shard VCLs) next to the
//! single VCL, each next to its floor measured in the same run on the same varnishd.
//!
//! The cluster, built through the API: `D` directors of 10 backends each (over the set-up dc,
//! all pointing at one origin), and `2 × D` routes with a URL and a header condition. Quick mode:
//! 100 directors (1,000 backends); `VAAS_BENCH_MODE=full`: 500 directors (5,000 backends) and
//! 1,000 routes.
//!
//! Figures, per VCL layout:
//! - **VaaS**: a synchronous write changing one backend's connection limit (a VCL never loaded
//!   before) until it answers, which is once the reload is active on every server;
//! - **floor**: what varnishd itself needs for the same change, over the admin CLI: for the
//!   split VCL, `vcl.inline` of the changed shard's text and of the version VCL's, and a
//!   `vcl.label` onto each; for the single VCL, `vcl.inline` + `vcl.use` of its text.
//! - **first load of the split VCL** (floor only): every shard and the top compiled afresh, what
//!   a server pays once (a new server, a restarted varnishd, the first split).
//!
//! Run: `cargo bench -p vaas-tests --bench incremental` (`VAAS_BENCH_ROUNDS`, default 5 for the
//! split VCL; the single VCL gets 2 rounds, each a full compile; `VAAS_BENCH_LAYOUTS=split` or
//! `single` measures only that one).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli};
use vaas_proto::v1::{
    Backend, CreateBackendRequest, CreateDirectorRequest, CreateRouteRequest, Director, Route,
    RouteAction, RouteLeft, RouteOperator, TaskState,
};
use vaas_testkit::HttpOrigin;
use vaas_tests::{
    StoreKind, System, SystemBuilder, backend_for, percentile, respond_async, route_condition,
};

/// Backends of every director.
const BACKENDS_PER_DIRECTOR: usize = 10;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::var("VAAS_BENCH_MODE").is_ok_and(|mode| mode == "full");
    let rounds: usize = std::env::var("VAAS_BENCH_ROUNDS")
        .unwrap_or_else(|_| "5".into())
        .parse()?;
    let directors = if full { 500 } else { 100 };
    println!(
        "incremental reload benchmark: {directors} directors, {} backends, {} routes, SQLite, \
         one varnishd, release build",
        directors * BACKENDS_PER_DIRECTOR,
        directors * 2
    );
    println!("| VCL layout | VaaS p50 | VaaS max | floor p50 | rounds |");
    println!("|---|---|---|---|---|");
    let layouts = std::env::var("VAAS_BENCH_LAYOUTS").unwrap_or_else(|_| "split,single".into());
    if layouts.contains("split") {
        let split = System::builder(StoreKind::Sqlite);
        measure("split: one backend changed", split, directors, rounds, true).await?;
    }
    if layouts.contains("single") {
        let single = System::builder(StoreKind::Sqlite).single_vcl();
        let label = "single VCL: one backend changed";
        measure(label, single, directors, 2, false).await?;
    }
    Ok(())
}

/// Builds the cluster on a system from `builder`, then times `rounds` synchronous backend
/// changes and their floor, and prints the row (and for the split VCL, the first-load row).
async fn measure(
    label: &str,
    builder: SystemBuilder,
    directors: usize,
    rounds: usize,
    split: bool,
) -> Result<()> {
    let mut system = builder.start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("bench-origin").await?;
    let changed = populate(&system, &setup, directors, &origin).await?;
    let mut vaas = system.time_backend_updates(changed, 100, rounds).await?;

    // The floor is varnishd alone: the agent would collect the shard VCLs the floor unlabels.
    system.ensure_running()?;
    system.stop_agent(0);
    let varnishd = system.varnishd(0);
    let secret = std::fs::read(varnishd.secret_file())?;
    let timeouts = CliTimeouts {
        load: Duration::from_secs(900),
        ..CliTimeouts::default()
    };
    let mut cli = VarnishCli::connect(varnishd.admin_addr(), &secret, timeouts).await?;
    cli.command(&["param.set", "cli_limit", "16m"]).await?;
    let list = cli.vcl_list().await?;
    let active = list
        .iter()
        .find(|vcl| vcl.is_active())
        .context("an active VCL")?
        .name
        .clone();
    let top = cli.command(&["vcl.show", &active]).await?.body;
    // The labels the active top VCL hands requests to (each top names all of its own).
    let labels: Vec<(String, String)> = list
        .iter()
        .filter_map(|vcl| Some((vcl.name.clone(), vcl.label.as_ref()?.name.clone())))
        .filter(|(label, _)| top.contains(&format!("vcl({label})")))
        .collect();
    ensure!(
        split != labels.is_empty(),
        "{label}: the active VCL hands requests to {} labels",
        labels.len()
    );
    let mut floor = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let top_copy = format!("floor_top{round}");
        if split {
            // The shard of the changed backend and the version VCL, compiled afresh (copies of
            // the same text) and labelled; the top VCL stays.
            let mut copies = Vec::new();
            for (label, target) in labels
                .iter()
                .filter(|(label, _)| label.starts_with("vaas_shard_"))
                .take(1)
                .chain(labels.iter().filter(|(label, _)| label == "vaas_version"))
            {
                let text = cli.command(&["vcl.show", target]).await?.body;
                copies.push((label.clone(), target.clone(), text));
            }
            let started = Instant::now();
            for (index, (label, _, text)) in copies.iter().enumerate() {
                let copy = format!("floor{round}_{index}");
                cli.vcl_inline(&copy, text).await?;
                cli.vcl_label(label, &copy).await?;
            }
            floor.push(started.elapsed());
            for (index, (label, target, _)) in copies.iter().enumerate() {
                cli.vcl_label(label, target).await?;
                cli.vcl_discard(&format!("floor{round}_{index}")).await?;
            }
        } else {
            let started = Instant::now();
            cli.vcl_inline(&top_copy, &top).await?;
            cli.vcl_use(&top_copy).await?;
            floor.push(started.elapsed());
            cli.vcl_use(&active).await?;
            cli.vcl_discard(&top_copy).await?;
        }
    }
    println!(
        "| {label} | {} | {} | {} | {rounds} |",
        seconds(percentile(&mut vaas, 0.5)),
        seconds(percentile(&mut vaas, 1.0)),
        seconds(percentile(&mut floor, 0.5)),
    );
    if split {
        let first_load = first_load(&mut cli, &active, &top, &labels).await?;
        println!(
            "| split: first load, {} shard and version VCLs and the top | – | – | {} | 1 |",
            labels.len(),
            seconds(first_load)
        );
    }
    Ok(())
}

/// Loads a copy of every shard (relabelled onto it: the same text serves the same) and of the
/// top VCL, and activates it; returns how long that took, then puts everything back.
async fn first_load(
    cli: &mut VarnishCli,
    active: &str,
    top: &str,
    labels: &[(String, String)],
) -> Result<Duration> {
    let mut texts = Vec::with_capacity(labels.len());
    for (_, shard) in labels {
        texts.push(cli.command(&["vcl.show", shard]).await?.body);
    }
    let started = Instant::now();
    for (index, ((label, _), text)) in labels.iter().zip(&texts).enumerate() {
        let copy = format!("first_shard{index}");
        cli.vcl_inline(&copy, text).await?;
        cli.vcl_label(label, &copy).await?;
    }
    cli.vcl_inline("first_top", top).await?;
    cli.vcl_use("first_top").await?;
    let elapsed = started.elapsed();
    cli.vcl_use(active).await?;
    for (index, (label, shard)) in labels.iter().enumerate() {
        cli.vcl_label(label, shard).await?;
        cli.vcl_discard(&format!("first_shard{index}")).await?;
    }
    cli.vcl_discard("first_top").await?;
    Ok(elapsed)
}

/// Creates the directors, their backends and the routes with asynchronous writes, waits until
/// the last task is done, and returns the id of the backend the rounds change.
async fn populate(
    system: &System,
    setup: &vaas_tests::Setup,
    directors: usize,
    origin: &HttpOrigin,
) -> Result<i64> {
    let mut director_ids = Vec::with_capacity(directors);
    for n in 0..directors {
        let created = system
            .config()
            .create_director(respond_async(CreateDirectorRequest {
                director: Some(Director {
                    name: format!("service_{n}"),
                    cluster_ids: vec![setup.cluster_id],
                    route_expression: format!("^/service-{n}/"),
                    ..Default::default()
                }),
            }))
            .await?
            .into_inner();
        director_ids.push(created.director.context("director")?.id);
    }
    let mut changed = None;
    let mut last_task = None;
    for (n, director_id) in director_ids.iter().enumerate() {
        for b in 0..BACKENDS_PER_DIRECTOR {
            let created = system
                .config()
                .create_backend(respond_async(CreateBackendRequest {
                    backend: Some(Backend {
                        director_id: *director_id,
                        address: format!("127.0.{}.{}", 1 + n / 250, 1 + n % 250),
                        port: Some(1024 + b as u32),
                        ..backend_for(setup, origin.addr())
                    }),
                }))
                .await?
                .into_inner();
            changed.get_or_insert(created.backend.context("backend")?.id);
        }
    }
    for n in 0..directors * 2 {
        let created = system
            .config()
            .create_route(respond_async(CreateRouteRequest {
                route: Some(Route {
                    conditions: vec![
                        route_condition(
                            RouteLeft::Url,
                            "",
                            RouteOperator::Matches,
                            &format!("^/route-{n}/"),
                        ),
                        route_condition(
                            RouteLeft::Header,
                            "X-Team",
                            RouteOperator::Equal,
                            &format!("team-{}", n % 17),
                        ),
                    ],
                    priority: (n % 500 + 1) as u32,
                    clusters_in_sync: true,
                    director_id: director_ids[n % directors],
                    action: RouteAction::Pass as i32,
                    ..Default::default()
                }),
            }))
            .await?
            .into_inner();
        last_task = created.tasks.last().map(|task| task.id);
    }
    let task_id = last_task.context("the writes created tasks")?;
    let last = system
        .watch(task_id)
        .await?
        .pop()
        .context("a task update")?;
    ensure!(
        last.state == TaskState::Success as i32,
        "the cluster's build ended in {}: {}",
        last.state,
        last.error
    );
    changed.context("a backend")
}

fn seconds(duration: Duration) -> String {
    format!("{:.3} s", duration.as_secs_f64())
}
