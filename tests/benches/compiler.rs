//! Compiler-flag benchmark: what varnishd's `cc_command` costs at reload and what it saves (or
//! not) per request, each figure next to its floor measured in the same run.
//!
//! For each flag set — the stock `-g -O2`, `-O2`, `-O1` (the deploy's) and `-O0`, all otherwise
//! the deploy's command — it measures:
//! 1. the reload: `vcl.inline` + `vcl.use` of one rendered VCL of N probed backends in N/10
//!    round-robin directors (what the agent sends; the compile is almost all of it);
//! 2. requests through varnishd loaded with that VCL: keep-alive connections sending cache hits
//!    (one URL, cached) and misses (a new URL each time, fetched from the origin), for a few
//!    seconds each, routed to the last director of the chain (the most route expressions tried).
//!
//! The floor of the reload is the same VCL loaded with `-O0` (the least the compiler does); the
//! floor of the requests is the same load sent straight to the origin, without varnishd.
//!
//! Run: `cargo bench -p vaas-tests --bench compiler` (quick: 100 and 1,000 backends, 2 s of load
//! per figure). `VAAS_BENCH_MODE=full` adds 5,000 backends (the stock flags at 5,000 take about
//! 4 minutes; `VAAS_BENCH_SKIP_SLOW=1` leaves that one out) and 5 s of load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vaas_agent::varnish_cli::{CliTimeouts, VarnishCli};
use vaas_proto::v1::{
    Backend, Cluster, ClusterSnapshot, Dc, Director, Probe, ServerStatus, VarnishServer,
    VclTemplate,
};
use vaas_testkit::{HttpOrigin, Varnishd, cc_command_with, deploy_cc_command};

/// Concurrent keep-alive connections of the load generator (two cores: more only queue).
const CONNECTIONS: usize = 8;

/// The host of every request.
const HOST: &str = "bench.example";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::var("VAAS_BENCH_MODE").is_ok_and(|mode| mode == "full");
    let skip_slow = std::env::var("VAAS_BENCH_SKIP_SLOW").is_ok();
    let sizes: &[usize] = if full {
        &[100, 1_000, 5_000]
    } else {
        &[100, 1_000]
    };
    let load_time = Duration::from_secs(if full { 5 } else { 2 });
    let deployed = deploy_cc_command().to_owned();
    let flag_sets: Vec<(String, String)> = ["-g -O2", "-O2", "-O1", "-O0"]
        .into_iter()
        .map(|flags| {
            let command = cc_command_with(&deployed, flags);
            let label = match flags {
                "-g -O2" => "stock -g -O2".to_owned(),
                _ if command == deployed => format!("{flags} (deploy)"),
                _ => flags.to_owned(),
            };
            (label, command)
        })
        .collect();
    let origin = HttpOrigin::start("origin").await?;
    let varnishd = Varnishd::start().await?;
    let secret = std::fs::read(varnishd.secret_file())?;
    let timeouts = CliTimeouts {
        load: Duration::from_secs(900),
        ..CliTimeouts::default()
    };
    let mut cli = VarnishCli::connect(varnishd.admin_addr(), &secret, timeouts).await?;
    cli.command(&["param.set", "cli_limit", "16m"]).await?;
    println!(
        "compiler benchmark: {} mode, {CONNECTIONS} connections, {} s of load per figure",
        if full { "full" } else { "quick" },
        load_time.as_secs()
    );

    println!("\nreload: vcl.inline + vcl.use of the rendered VCL (floor: the same at -O0)");
    println!(
        "| flags | {} |",
        sizes
            .iter()
            .map(|n| format!("{n} backends"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(sizes.len()));
    let vcls: Vec<String> = sizes
        .iter()
        .map(|&size| Ok(vaas_vcl::render(&snapshot(size, origin.addr()), 1)?.text))
        .collect::<Result<_>>()?;
    let mut loaded = 0;
    for (label, command) in &flag_sets {
        cli.command(&["param.set", "cc_command", command]).await?;
        let mut cells = Vec::new();
        for (vcl, &size) in vcls.iter().zip(sizes) {
            if skip_slow && size >= 5_000 && label.starts_with("stock") {
                cells.push("skipped".to_owned());
                continue;
            }
            loaded += 1;
            let name = format!("bench{loaded}");
            let started = Instant::now();
            cli.vcl_inline(&name, vcl).await?;
            cli.vcl_use(&name).await?;
            cells.push(format!("{:.2} s", started.elapsed().as_secs_f64()));
        }
        println!("| {label} | {} |", cells.join(" | "));
    }

    // The child must run for requests; started once a VCL is active.
    if cli.status().await? != vaas_agent::varnish_cli::ChildState::Running {
        cli.start().await?;
    }
    let size = sizes[1];
    let path_prefix = format!("/service-{}/", size / 10);
    println!(
        "\nrequests through varnishd with the {size}-backend VCL, to the last of its {} directors",
        size / 10
    );
    println!("| flags | hits/s | hit p50 | hit p99 | misses/s | miss p50 | miss p99 |");
    println!("|---|---|---|---|---|---|---|");
    let origin_hits = load(origin.addr(), &path_prefix, false, load_time).await?;
    let origin_misses = load(origin.addr(), &path_prefix, true, load_time).await?;
    println!(
        "| floor: the origin alone | {} | {} |",
        origin_hits.cells(),
        origin_misses.cells()
    );
    for (label, command) in &flag_sets {
        cli.command(&["param.set", "cc_command", command]).await?;
        loaded += 1;
        let name = format!("bench{loaded}");
        cli.vcl_inline(&name, &vcls[1]).await?;
        cli.vcl_use(&name).await?;
        let hits = load(varnishd.http_addr(), &path_prefix, false, load_time).await?;
        let misses = load(varnishd.http_addr(), &path_prefix, true, load_time).await?;
        println!("| {label} | {} | {} |", hits.cells(), misses.cells());
    }
    cli.command(&["param.set", "cc_command", &deployed]).await?;
    Ok(())
}

/// A cluster of one server and `size` backends (all pointing at `origin`, each probed) in
/// `size / 10` round-robin directors routed by path `/service-<n>/`, over two datacenters.
fn snapshot(size: usize, origin: SocketAddr) -> ClusterSnapshot {
    let directors = (size / 10) as i64;
    ClusterSnapshot {
        version: 1,
        cluster: Some(Cluster {
            id: 1,
            name: "bench".into(),
            ..Default::default()
        }),
        servers: vec![VarnishServer {
            id: 1,
            address: "127.0.0.1".into(),
            status: ServerStatus::Active as i32,
            dc_id: 1,
            template_id: 1,
            cluster_id: 1,
            ..Default::default()
        }],
        dcs: vec![
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
        ],
        templates: vec![VclTemplate {
            id: 1,
            name: "bench".into(),
            content: "<VCL/>".into(),
            ..Default::default()
        }],
        probes: vec![Probe {
            id: 1,
            name: "health".into(),
            url: "/health".into(),
            start_as_healthy: true,
            ..Default::default()
        }],
        directors: (1..=directors)
            .map(|id| Director {
                id,
                name: format!("service_{id}"),
                cluster_ids: vec![1],
                route_expression: format!("^/service-{id}/"),
                probe_id: 1,
                ..Default::default()
            })
            .collect(),
        backends: (1..=directors)
            .flat_map(|director| {
                (0..10).map(move |n| Backend {
                    id: director * 10 + n,
                    director_id: director,
                    dc_id: 1 + n % 2,
                    address: origin.ip().to_string(),
                    port: Some(u32::from(origin.port())),
                    ..Default::default()
                })
            })
            .collect(),
        ..Default::default()
    }
}

/// What one load run measured.
struct LoadResult {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl LoadResult {
    /// "requests/s | p50 | p99" for a table row.
    fn cells(&self) -> String {
        let mut latencies = self.latencies.clone();
        latencies.sort();
        let at = |fraction: f64| {
            let index = ((latencies.len() as f64 - 1.0) * fraction).round() as usize;
            latencies[index].as_secs_f64() * 1000.0
        };
        format!(
            "{:.0} | {:.2} ms | {:.2} ms",
            self.requests as f64 / self.elapsed.as_secs_f64(),
            at(0.5),
            at(0.99)
        )
    }
}

/// Sends GETs over [`CONNECTIONS`] keep-alive connections to `addr` for `duration`: the same
/// URL every time (`unique` false: cache hits once the first is cached), or a new URL each time
/// (misses, each fetched from the origin).
async fn load(
    addr: SocketAddr,
    prefix: &str,
    unique: bool,
    duration: Duration,
) -> Result<LoadResult> {
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for worker in 0..CONNECTIONS {
        let counter = counter.clone();
        let prefix = prefix.to_owned();
        workers.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut latencies = Vec::new();
            let mut buffer = Vec::with_capacity(4096);
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let path = if unique {
                    format!("{prefix}miss-{worker}-{n}")
                } else {
                    format!("{prefix}hit")
                };
                let request = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
                let sent = Instant::now();
                stream.write_all(request.as_bytes()).await?;
                read_response(&mut stream, &mut buffer).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    Ok(LoadResult {
        requests: latencies.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    })
}

/// Reads one response with a Content-Length body from a keep-alive connection; fails on
/// anything but a 200.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<()> {
    loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                bail!(
                    "unexpected response: {}",
                    head.lines().next().unwrap_or_default()
                );
            }
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .context("a Content-Length")?
                .trim()
                .parse()?;
            let total = end + 4 + length;
            while buffer.len() < total {
                read_more(stream, buffer).await?;
            }
            buffer.drain(..total);
            return Ok(());
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0_u8; 4096];
    let read = stream.read(&mut chunk).await?;
    if read == 0 {
        bail!("the connection closed");
    }
    buffer.extend_from_slice(&chunk[..read]);
    Ok(())
}
