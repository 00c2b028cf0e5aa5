//! Write benchmark: asynchronous writes (`prefer: respond-async`) through the real API on
//! PostgreSQL and SQLite — throughput and accept latency (validated, committed with their task
//! and outbox row, answered) — next to the floor measured in the same run on the same database:
//! one-row INSERT transactions at the same concurrency, which is what the database itself commits.
//!
//! Workloads: weight updates of 50 backends at concurrency 16 and 64, and creates of new
//! backends at concurrency 16. Run: `cargo bench -p vaas-tests --bench writes` (quick: 500 writes
//! per workload); `VAAS_BENCH_MODE=full` sends 2,000.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::Connection;
use tokio::sync::Semaphore;
use vaas_proto::v1::{Backend, CreateBackendRequest, UpdateBackendRequest};
use vaas_testkit::HttpOrigin;
use vaas_tests::{Setup, StoreKind, System, backend_for, respond_async};

/// Backends the weight updates go round.
const UPDATED_BACKENDS: usize = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::var("VAAS_BENCH_MODE").is_ok_and(|mode| mode == "full");
    let writes = if full { 2_000 } else { 500 };
    println!(
        "write benchmark: {} mode, {writes} asynchronous writes per workload, 1 agent, release build",
        if full { "full" } else { "quick" }
    );
    println!(
        "| store | workload | writes/s | p50 | p99 | max | floor writes/s | floor p50 | floor p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for store in [StoreKind::Postgres, StoreKind::Sqlite] {
        bench_store(store, writes).await?;
    }
    Ok(())
}

async fn bench_store(store: StoreKind, writes: usize) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin").await?;
    let mut backends = Vec::with_capacity(UPDATED_BACKENDS);
    for n in 0..UPDATED_BACKENDS {
        let mut backend = backend_for(&setup, origin.addr());
        backend.port = Some(20_000 + n as u32);
        let created = system
            .config()
            .create_backend(respond_async(CreateBackendRequest {
                backend: Some(backend),
            }))
            .await?
            .into_inner()
            .backend
            .context("backend")?;
        backends.push(created);
    }
    let name = match store {
        StoreKind::Postgres => "PostgreSQL",
        StoreKind::Sqlite => "SQLite",
    };
    let floor = Floor::new(system.database_url()).await?;
    for concurrency in [16, 64] {
        let measured = run(writes, concurrency, |n| {
            let mut backend = backends[n % UPDATED_BACKENDS].clone();
            backend.weight = Some(1 + (n % 50) as u32);
            let mut config = system.config();
            async move {
                config
                    .update_backend(respond_async(UpdateBackendRequest {
                        backend: Some(backend),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["weight".into()],
                        }),
                    }))
                    .await?;
                anyhow::Ok(())
            }
        })
        .await?;
        let floor = floor.measure(writes, concurrency).await?;
        print_row(
            name,
            &format!("weight updates, concurrency {concurrency}"),
            &measured,
            &floor,
        );
    }
    let measured = run(writes, 16, |n| {
        let backend = new_backend(&setup, &origin, n);
        let mut config = system.config();
        async move {
            config
                .create_backend(respond_async(CreateBackendRequest {
                    backend: Some(backend),
                }))
                .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    let floor_measured = floor.measure(writes, 16).await?;
    print_row(name, "creates, concurrency 16", &measured, &floor_measured);
    floor.drop_table().await?;
    system.ensure_running()
}

/// A backend on a port no other write of the run uses.
fn new_backend(setup: &Setup, origin: &HttpOrigin, n: usize) -> Backend {
    let mut backend = backend_for(setup, origin.addr());
    backend.port = Some(30_000 + n as u32);
    backend
}

/// What one workload measured: the wall time and each write's latency.
struct Measured {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn at(&self, fraction: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }
}

fn print_row(store: &str, workload: &str, measured: &Measured, floor: &Measured) {
    println!(
        "| {store} | {workload} | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} | {:.2} ms | {:.2} ms |",
        measured.rate(),
        measured.at(0.5),
        measured.at(0.99),
        measured.at(1.0),
        floor.rate(),
        floor.at(0.5),
        floor.at(0.99),
    );
}

/// Runs `write(n)` for n in 0..count with at most `concurrency` at a time.
async fn run<F, Fut>(count: usize, concurrency: usize, write: F) -> Result<Measured>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let future = write(n);
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let result = future.await;
            drop(permit);
            result.map(|()| sent.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok(Measured {
        elapsed: started.elapsed(),
        latencies,
    })
}

/// The floor: one-row INSERT transactions on the benchmark's own database.
struct Floor {
    url: String,
}

impl Floor {
    async fn new(url: &str) -> Result<Floor> {
        sqlx::any::install_default_drivers();
        let mut connection = sqlx::AnyConnection::connect(url).await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS bench_floor (v BIGINT NOT NULL)")
            .execute(&mut connection)
            .await?;
        connection.close().await?;
        Ok(Floor {
            url: url.to_owned(),
        })
    }

    /// Commits `count` one-row transactions, `concurrency` at a time, each on its own pooled
    /// connection.
    async fn measure(&self, count: usize, concurrency: usize) -> Result<Measured> {
        let sqlite = self.url.starts_with("sqlite:");
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(concurrency as u32)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if sqlite {
                        // As the store's own connections: writers wait for each other.
                        sqlx::Executor::execute(connection, "PRAGMA busy_timeout = 10000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&self.url)
            .await?;
        let measured = run(count, concurrency, |n| {
            let pool = pool.clone();
            async move {
                let mut transaction = pool.begin().await?;
                sqlx::query("INSERT INTO bench_floor (v) VALUES ($1)")
                    .bind(n as i64)
                    .execute(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                anyhow::Ok(())
            }
        })
        .await;
        pool.close().await;
        measured
    }

    async fn drop_table(&self) -> Result<()> {
        let mut connection = sqlx::AnyConnection::connect(&self.url).await?;
        sqlx::query("DROP TABLE bench_floor")
            .execute(&mut connection)
            .await?;
        connection.close().await?;
        Ok(())
    }
}
