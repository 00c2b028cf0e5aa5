//! The outbox relay: publishes the intents that writes left in the outbox, then deletes them.
//!
//! A crash between commit and publish loses nothing (the row stays until it is published), and
//! a publish repeated after a crash or by another replica is dropped by JetStream as a duplicate
//! (the message id is the task id). After any NATS error the next pass first makes sure the
//! stream exists, so a NATS that restarted without its data gets it back with the next publish.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use vaas_bus::Intent;
use vaas_store::Store;

/// How many outbox rows one pass reads.
const BATCH: i64 = 256;

/// Publishes outbox rows until `shutdown`; `wake` is notified after every committed write, and
/// the outbox is also read every `poll_interval` (rows of other replicas, failed publishes).
pub async fn run(
    store: Store,
    jetstream: async_nats::jetstream::Context,
    wake: Arc<Notify>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut stream_ready = false;
    let mut failures: u32 = 0;
    loop {
        let outcome = async {
            if !stream_ready {
                vaas_bus::intents_stream(&jetstream).await?;
                stream_ready = true;
            }
            publish_pending(&store, &jetstream).await
        }
        .await;
        let pause = match outcome {
            Ok(()) => {
                failures = 0;
                poll_interval
            }
            Err(error) => {
                if matches!(error, RelayError::Bus(_)) {
                    // The stream may be gone (NATS lost its data): create it before publishing.
                    stream_ready = false;
                }
                failures = failures.saturating_add(1);
                warn!(error = %error, failures, "outbox relay pass failed; retrying");
                Duration::from_millis(100 * 2u64.pow(failures.min(6))).min(poll_interval * 5)
            }
        };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Errors of one relay pass.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("store: {0}")]
    Store(#[from] vaas_store::Error),
    #[error("nats: {0}")]
    Bus(#[from] vaas_bus::Error),
}

async fn publish_pending(
    store: &Store,
    jetstream: &async_nats::jetstream::Context,
) -> Result<(), RelayError> {
    loop {
        let entries = store.pending_outbox(BATCH).await?;
        if entries.is_empty() {
            return Ok(());
        }
        for entry in entries {
            let intent = Intent {
                cluster_id: entry.cluster_id,
                task_id: entry.task_id,
                timestamp: entry.timestamp,
            };
            vaas_bus::publish_intent(jetstream, &intent).await?;
            store.delete_outbox(entry.id).await?;
            debug!(
                task = entry.task_id,
                cluster = entry.cluster_id,
                "published intent"
            );
        }
    }
}
