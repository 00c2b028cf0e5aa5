//! Convergence without writes: after a fault, a server gets back to its cluster's VCL by itself,
//! and VaaS knows what it runs, although nobody writes anything.

use std::time::Duration;

use anyhow::{Result, ensure};
use tokio::time::Instant;
use vaas_proto::v1::CreateBackendRequest;
use vaas_testkit::{HttpOrigin, http_get};
use vaas_tests::{StoreKind, System, backend_for};

/// How long after a fault a server may take to serve its cluster's VCL again.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_varnishd_restarted_while_idle_serves_the_current_vcl_again_without_any_write()
-> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin-before-restart").await?;
    system
        .config()
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;
    let served = http_get(system.varnishd(0).http_addr(), "/", "demo.example").await?;
    ensure!(
        served.header("x-origin") == Some(origin.name()),
        "served before the restart: {served:?}"
    );
    let running_before = system.server(setup.server_id).await?.running_vcl_version;
    ensure!(
        !running_before.is_empty(),
        "the server runs a known version"
    );

    // varnishd restarts empty (-f ''), its agent stays up, and nobody writes.
    let restart_began = Instant::now();
    system.restart_varnishd(0).await?;
    let varnishd_back = Instant::now();
    loop {
        let response = http_get(system.varnishd(0).http_addr(), "/", "demo.example").await;
        if let Ok(response) = &response
            && response.header("x-origin") == Some(origin.name())
        {
            break;
        }
        ensure!(
            restart_began.elapsed() < CONVERGENCE_BOUND,
            "varnishd still answers {response:?} {:?} after its restart began",
            restart_began.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "varnishd restart: page served again {:?} after the restart began, {:?} after the new \
         varnishd answered its admin port",
        restart_began.elapsed(),
        varnishd_back.elapsed()
    );
    let version = http_get(system.varnishd(0).http_addr(), "/vaas_version", "x").await?;
    ensure!(
        version.body.trim() == running_before,
        "varnishd serves {} instead of {running_before}",
        version.body.trim()
    );

    // The agent told the scheduler what runs: VaaS reports the same running version.
    loop {
        let running = system.server(setup.server_id).await?.running_vcl_version;
        if running == running_before {
            break;
        }
        ensure!(
            restart_began.elapsed() < CONVERGENCE_BOUND,
            "the server's running version is {running:?}, not {running_before:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.ensure_running()
}
