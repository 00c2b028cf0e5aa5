//! Records where each server stands in a reload: reloads report every phase change here at once,
//! and a writer stores the newest state of each server in batches (one transaction per batch,
//! never more than one in flight), then tells watchers through a cluster event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use vaas_proto::v1::{ServerPhase, ServerReloadProgress};
use vaas_store::{ReloadProgressRow, Store};

/// How long the writer gathers phase changes before it stores them together.
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// (cluster, reload version, server)
type ProgressKey = (i64, i64, i64);

/// Reload progress waiting to be stored, newest state per server; cheap to share.
#[derive(Debug)]
pub struct ProgressRecorder {
    store: Store,
    nats: async_nats::Client,
    pending: Mutex<HashMap<ProgressKey, ServerReloadProgress>>,
    /// Held while a batch is written, so that an older batch never lands after a newer one.
    writing: tokio::sync::Mutex<()>,
    recorded: Notify,
}

impl ProgressRecorder {
    /// Creates a recorder that writes to `store` and announces on `nats`.
    pub fn new(store: Store, nats: async_nats::Client) -> Arc<ProgressRecorder> {
        Arc::new(ProgressRecorder {
            store,
            nats,
            pending: Mutex::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
            recorded: Notify::new(),
        })
    }

    /// Notes a server's new phase in the reload of `cluster_id` at `version`; never waits. The
    /// pending map holds one entry per server of the reloads in flight, so it stays bounded.
    pub fn record(&self, cluster_id: i64, version: i64, progress: &ServerReloadProgress) {
        let mut progress = progress.clone();
        progress.update_time = Some(std::time::SystemTime::now().into());
        self.pending
            .lock()
            .expect("progress lock")
            .insert((cluster_id, version, progress.varnish_server_id), progress);
        self.recorded.notify_one();
    }

    /// Stores what is pending now; a failed write is logged and its rows kept for the next one
    /// unless a newer state replaced them meanwhile.
    pub async fn flush(&self) {
        let _writing = self.writing.lock().await;
        let batch = std::mem::take(&mut *self.pending.lock().expect("progress lock"));
        if batch.is_empty() {
            return;
        }
        let rows: Vec<ReloadProgressRow> = batch
            .iter()
            .map(|(&(cluster_id, version, _), progress)| ReloadProgressRow {
                cluster_id,
                version,
                progress: progress.clone(),
            })
            .collect();
        if let Err(error) = self.store.record_reload_progress(&rows).await {
            warn!(%error, rows = rows.len(), "cannot record reload progress; trying again");
            let mut pending = self.pending.lock().expect("progress lock");
            for (key, progress) in batch {
                pending.entry(key).or_insert(progress);
            }
            return;
        }
        let mut clusters: Vec<i64> = rows.iter().map(|row| row.cluster_id).collect();
        clusters.sort_unstable();
        clusters.dedup();
        for cluster_id in clusters {
            if let Err(error) = vaas_bus::publish_cluster_event(&self.nats, cluster_id).await {
                // Watchers also re-read on their own schedule; a lost event only delays them.
                warn!(cluster = cluster_id, %error, "cannot publish cluster event");
            }
        }
    }

    /// Writes batches as phases change until `shutdown`, then writes what is left.
    pub async fn run_writer(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.recorded.notified() => {}
                () = shutdown.cancelled() => break,
            }
            tokio::time::sleep(BATCH_WINDOW).await;
            self.flush().await;
        }
        self.flush().await;
    }
}

/// A server's progress at the start of a reload.
pub fn initial(server_id: i64, address: &str) -> ServerReloadProgress {
    ServerReloadProgress {
        varnish_server_id: server_id,
        address: address.to_owned(),
        phase: ServerPhase::WaitingForAgent as i32,
        ..Default::default()
    }
}
