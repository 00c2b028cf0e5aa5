//! Reload benchmark: how long a synchronous write takes until varnishd serves it, next to the
//! physical floor measured in the same run on the same varnishd — loading and activating the
//! very same VCL text directly over the admin CLI (`vcl.inline` + `vcl.use`).
//!
//! Also measures how a burst of asynchronous writes coalesces into few reloads, and the resident
//! memory of the three services afterwards. Run: `cargo bench -p vaas-tests --bench reload`
//! (`VAAS_BENCH_ROUNDS`, default 10; `VAAS_BENCH_BACKENDS`, default "1,100";
//! `VAAS_BENCH_SERVERS`, the cluster sizes in varnishd, default "1": the floor of a cluster is
//! the same VCL loaded and activated on all its servers at once).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tonic::Request;
use tonic::metadata::MetadataValue;
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli};
use vaas_proto::v1::{Backend, CreateBackendRequest, TaskState};
use vaas_testkit::HttpOrigin;
use vaas_tests::{StoreKind, System, backend_for, millis, percentile};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let rounds: usize = env_or("VAAS_BENCH_ROUNDS", "10").parse()?;
    let sizes: Vec<usize> = env_or("VAAS_BENCH_BACKENDS", "1,100")
        .split(',')
        .map(|size| size.trim().parse())
        .collect::<Result<_, _>>()?;
    let server_counts: Vec<usize> = env_or("VAAS_BENCH_SERVERS", "1")
        .split(',')
        .map(|count| count.trim().parse())
        .collect::<Result<_, _>>()?;
    println!("reload benchmark: {rounds} rounds per size, SQLite store, release build");
    println!(
        "{:>8} | {:>8} | {:>16} | {:>16} | {:>16} | {:>9}",
        "servers", "backends", "floor p50 (ms)", "vaas p50 (ms)", "vaas p90 (ms)", "overhead"
    );
    for &servers in &server_counts {
        for &size in &sizes {
            bench_size(size, servers, rounds).await?;
        }
    }
    Ok(())
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// What a burst of asynchronous creates cost.
struct Burst {
    /// Reloads that applied it.
    reloads: usize,
    /// How long each write took to answer.
    answers: Vec<Duration>,
    /// From the first write to the last task's terminal state.
    until_done: Duration,
}

/// Where the time of one write until it was active on every server went, from the task's own
/// record (store clock, the agents' measured phases) and the client's clock.
struct Hops {
    /// The asynchronous write until its answer: the API's validation and the store's commit.
    accept: Duration,
    /// The answer until the scheduler started the reload: outbox relay, JetStream, the
    /// scheduler's pick-up (the relay may begin before the answer arrives).
    to_scheduler: Duration,
    /// The slowest server's rendering, as its agent measured it.
    render: Duration,
    /// The slowest server's `vcl.inline` (the compiler: the floor).
    compile: Duration,
    /// The slowest server's `vcl.use`.
    activate: Duration,
    /// The reload's start until the last server was active, less render, compile and activate:
    /// the snapshot read, the streams to the agents and the two phases' bookkeeping.
    dispatch: Duration,
    /// The last server active until the task was terminal in the store.
    finish: Duration,
    /// The terminal task until the client's watch saw it.
    notify: Duration,
    /// The write sent until the watch saw the task terminal.
    total: Duration,
}

/// Changes backend `id`'s connection limit to `limit` asynchronously, follows the task until it
/// is terminal, and splits its time by hop.
async fn time_hops(system: &System, id: i64, limit: u32) -> Result<Hops> {
    let sent = std::time::SystemTime::now();
    let started = Instant::now();
    let answer = system
        .config()
        .update_backend(vaas_tests::respond_async(
            vaas_tests::connection_limit_update(id, limit),
        ))
        .await?
        .into_inner();
    let accept = started.elapsed();
    let task = answer.tasks.first().context("the write made a task")?;
    let updates = system.watch(task.id).await?;
    let seen = std::time::SystemTime::now();
    let total = started.elapsed();
    let done = updates.last().context("the watch saw the task")?;
    anyhow::ensure!(
        done.state == TaskState::Success as i32,
        "the reload failed: {}",
        done.error
    );
    let done = system.task(task.id).await?;
    let at = |timestamp: Option<prost_types::Timestamp>| -> Result<std::time::SystemTime> {
        let timestamp = timestamp.context("a task time is missing")?;
        Ok(std::time::UNIX_EPOCH + Duration::new(timestamp.seconds as u64, timestamp.nanos as u32))
    };
    let between = |from: std::time::SystemTime, to: std::time::SystemTime| {
        to.duration_since(from).unwrap_or_default()
    };
    let longest =
        |pick: fn(&vaas_proto::v1::ServerReloadProgress) -> Option<prost_types::Duration>| {
            done.servers
                .iter()
                .filter_map(pick)
                .map(|duration| Duration::try_from(duration).unwrap_or_default())
                .max()
                .unwrap_or_default()
        };
    let render = longest(|server| server.render_duration);
    let compile = longest(|server| server.compile_duration);
    let activate = longest(|server| server.activate_duration);
    let mut active = Vec::with_capacity(done.servers.len());
    for server in &done.servers {
        active.push(at(server.update_time)?);
    }
    let start = at(done.start_time)?;
    let finish = at(done.finish_time)?;
    let last_active = active
        .into_iter()
        .max()
        .context("the task shows its servers")?;
    Ok(Hops {
        accept,
        to_scheduler: between(sent + accept, start),
        render,
        compile,
        activate,
        dispatch: between(start, last_active).saturating_sub(render + compile + activate),
        finish: between(last_active, finish),
        notify: between(finish, seen),
        total,
    })
}

/// Prints the p50 of every hop, and the overhead: everything but the compile and `vcl.use`.
fn print_hops(hops: &mut [Hops]) {
    let p50 = |pick: fn(&Hops) -> Duration| {
        let mut samples: Vec<Duration> = hops.iter().map(pick).collect();
        millis(percentile(&mut samples, 0.5))
    };
    let (accept, to_scheduler, render, compile, activate, dispatch, finish, notify, total) = (
        p50(|hop| hop.accept),
        p50(|hop| hop.to_scheduler),
        p50(|hop| hop.render),
        p50(|hop| hop.compile),
        p50(|hop| hop.activate),
        p50(|hop| hop.dispatch),
        p50(|hop| hop.finish),
        p50(|hop| hop.notify),
        p50(|hop| hop.total),
    );
    let overhead = p50(|hop| hop.total.saturating_sub(hop.compile + hop.activate));
    println!(
        "         | by hop, p50 of {} asynchronous writes followed with WatchTask (ms): API + store \
         {accept:.1}, relay + NATS + scheduler pick-up {to_scheduler:.1}, snapshot + streams + \
         phases {dispatch:.1}, render {render:.1}, vcl.inline {compile:.1}, vcl.use \
         {activate:.1}, task finish {finish:.1}, watch {notify:.1}; total {total:.1}, overhead \
         (total less vcl.inline and vcl.use) {overhead:.1}",
        hops.len()
    );
}

/// Creates `count` backends with asynchronous writes and waits for the last task to finish.
async fn create_backends(system: &System, template: &Backend, count: usize) -> Result<Burst> {
    let mut answers = Vec::with_capacity(count);
    let burst_started = Instant::now();
    let reloads_before = system.scheduler_log().matches("reload succeeded").count();
    let mut last_task = None;
    for index in 0..count {
        let mut backend = template.clone();
        backend.address = format!("127.0.{}.{}", 1 + index / 250, 1 + index % 250);
        let mut request = Request::new(CreateBackendRequest {
            backend: Some(backend),
        });
        request
            .metadata_mut()
            .insert("prefer", MetadataValue::from_static("respond-async"));
        let started = Instant::now();
        let created = system.config().create_backend(request).await?.into_inner();
        answers.push(started.elapsed());
        last_task = created.tasks.last().map(|task| task.id);
    }
    let task_id = last_task.context("the writes created tasks")?;
    let state = system
        .watch(task_id)
        .await?
        .last()
        .map_or(0, |task| task.state);
    anyhow::ensure!(
        state == TaskState::Success as i32,
        "bulk create ended in {state}"
    );
    let until_done = burst_started.elapsed();
    let reloads = system.scheduler_log().matches("reload succeeded").count() - reloads_before;
    Ok(Burst {
        reloads,
        answers,
        until_done,
    })
}

/// Measures a cluster of `servers` varnishd (each with its agent) and `size` backends.
async fn bench_size(size: usize, servers: usize, rounds: usize) -> Result<()> {
    // One VCL at every size: the floor below loads the active VCL's text, and split VCLs have
    // their own benchmark (`--bench incremental`).
    let mut system = System::builder(StoreKind::Sqlite)
        .agents(servers)
        .single_vcl()
        .start()
        .await?;
    let setup = system.set_up().await?;
    for index in 1..servers {
        system
            .add_server(index, setup.dc_id, setup.template_id, setup.cluster_id)
            .await?;
    }
    let origin = HttpOrigin::start("bench-origin").await?;
    let first = system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?
        .into_inner()
        .backend
        .context("backend")?;
    let burst = if size > 1 {
        Some(create_backends(&system, &backend_for(&setup, origin.addr()), size - 1).await?)
    } else {
        None
    };

    // VaaS: synchronous writes that each produce a VCL never loaded before.
    let mut vaas = system.time_backend_updates(first.id, 10, rounds).await?;
    // The same writes asynchronously, each followed until it is terminal and split by hop.
    let mut hops = Vec::with_capacity(rounds);
    for round in 0..rounds {
        hops.push(time_hops(&system, first.id, 1000 + round as u32).await?);
    }

    // The floor: the same VCL text straight into the same varnishd.
    let varnishd = system.varnishd(0);
    let secret = std::fs::read(varnishd.secret_file())?;
    let mut cli =
        VarnishCli::connect(varnishd.admin_addr(), &secret, CliTimeouts::default()).await?;
    let active = cli
        .vcl_list()
        .await?
        .into_iter()
        .find(|vcl| vcl.is_active())
        .context("an active VCL")?;
    // A large VCL does not fit the default 48 KiB answer limit of the CLI.
    cli.command(&["param.set", "cli_limit", "16m"]).await?;
    let text = cli.command(&["vcl.show", &active.name]).await?.body;
    // The floor of a cluster: the same text loaded and activated on every server at once.
    let mut others = Vec::with_capacity(servers.saturating_sub(1));
    for index in 1..servers {
        let varnishd = system.varnishd(index);
        let secret = std::fs::read(varnishd.secret_file())?;
        let mut other =
            VarnishCli::connect(varnishd.admin_addr(), &secret, CliTimeouts::default()).await?;
        other.command(&["param.set", "cli_limit", "16m"]).await?;
        let active = other
            .vcl_list()
            .await?
            .into_iter()
            .find(|vcl| vcl.is_active())
            .context("an active VCL")?
            .name;
        others.push((other, active));
    }
    let mut floor = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let name = format!("floor{round}");
        let started = Instant::now();
        let loads = others.iter_mut().map(|(other, _)| async {
            other.vcl_inline(&name, &text).await?;
            other.vcl_use(&name).await
        });
        let (first, rest) = tokio::join!(
            async {
                cli.vcl_inline(&name, &text).await?;
                cli.vcl_use(&name).await
            },
            futures::future::join_all(loads)
        );
        first?;
        rest.into_iter().collect::<Result<Vec<_>, _>>()?;
        floor.push(started.elapsed());
        cli.vcl_use(&active.name).await?;
        cli.vcl_discard(&name).await?;
        for (other, active) in &mut others {
            other.vcl_use(active).await?;
            other.vcl_discard(&name).await?;
        }
    }

    // The same floor with the C compiler at -O0 (the lever VARNISH.md names), for comparison.
    let shown = cli.command(&["param.show", "cc_command"]).await?.body;
    let default_cc = shown
        .lines()
        .find_map(|line| line.trim().strip_prefix("Value is:"))
        .map(|value| value.trim().trim_end_matches("(default)").trim().to_owned())
        .context("param.show cc_command has a value")?;
    cli.command(&[
        "param.set",
        "cc_command",
        &vaas_testkit::cc_command_with(&default_cc, "-O0"),
    ])
    .await?;
    let mut floor_o0 = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let name = format!("floor_o0_{round}");
        let started = Instant::now();
        cli.vcl_inline(&name, &text).await?;
        cli.vcl_use(&name).await?;
        floor_o0.push(started.elapsed());
        cli.vcl_use(&active.name).await?;
        cli.vcl_discard(&name).await?;
    }
    cli.command(&["param.set", "cc_command", &default_cc])
        .await?;

    let floor_p50 = percentile(&mut floor, 0.5);
    let vaas_p50 = percentile(&mut vaas, 0.5);
    let vaas_p90 = percentile(&mut vaas, 0.9);
    println!(
        "{servers:>8} | {size:>8} | {:>16.0} | {:>16.0} | {:>16.0} | {:>8.0}%",
        millis(floor_p50),
        millis(vaas_p50),
        millis(vaas_p90),
        (vaas_p50.as_secs_f64() / floor_p50.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "         | floor on the first server alone with cc_command at -O0 instead of the deploy's: p50 {:.0} ms",
        millis(percentile(&mut floor_o0, 0.5))
    );
    if let Some(mut burst) = burst {
        println!(
            "         | {} asynchronous creates were applied by {} reload(s), the last task \
             terminal {:.0} ms after the first write; each answered in p50 {:.1} ms, p90 {:.1} ms \
             (validated, committed with task and outbox row)",
            size - 1,
            burst.reloads,
            millis(burst.until_done),
            millis(percentile(&mut burst.answers, 0.5)),
            millis(percentile(&mut burst.answers, 0.9)),
        );
    }
    print_hops(&mut hops);
    let memory: Vec<String> = system
        .resident_kib()
        .iter()
        .map(|(name, kib)| format!("{name} {} MiB", kib.map_or(0, |kib| kib / 1024)))
        .collect();
    println!(
        "         | resident memory after the run: {}",
        memory.join(", ")
    );
    Ok(())
}
