//! Leader election among scheduler replicas through a lease in a NATS key-value bucket.
//!
//! The leader holds the key [`LEASE_KEY`] and renews it by compare-and-set every third of the
//! lease's time to live; the others try to create the key at the same pace, which succeeds only
//! once it was released (on shutdown) or expired (a crashed or cut-off leader). A leader that
//! cannot renew in time steps down before its lease can expire, so two replicas never drive
//! reloads at once.

use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The key of the lease in [`vaas_bus::LEADER_BUCKET`].
pub const LEASE_KEY: &str = "leader";

/// Runs the election until `shutdown`. While this replica leads, `term` holds a token that is
/// cancelled the moment it stops leading; otherwise it holds `None`.
pub async fn run_election(
    lease: kv::Store,
    replica: String,
    lease_ttl: Duration,
    term: watch::Sender<Option<CancellationToken>>,
    shutdown: CancellationToken,
) {
    let renew_every = lease_ttl / 3;
    while !shutdown.is_cancelled() {
        match acquire(&lease, &replica).await {
            Ok(Some(revision)) => {
                lead(&lease, &replica, revision, renew_every, &term, &shutdown).await;
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot reach the leader lease"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(renew_every) => {}
        }
    }
}

/// Holds the lease, renewing it, until shutdown (then releases it) or a failed renewal.
async fn lead(
    lease: &kv::Store,
    replica: &str,
    mut revision: u64,
    renew_every: Duration,
    term: &watch::Sender<Option<CancellationToken>>,
    shutdown: &CancellationToken,
) {
    let leading = shutdown.child_token();
    term.send_replace(Some(leading.clone()));
    info!(replica, "leading: this replica drives reloads");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                leading.cancel();
                term.send_replace(None);
                // Releasing lets a standby take over now instead of after the lease expires.
                if let Err(error) = lease.delete_expect_revision(LEASE_KEY, Some(revision)).await {
                    warn!(%error, "cannot release the leader lease");
                }
                return;
            }
            () = tokio::time::sleep(renew_every) => {}
        }
        let renewal = tokio::time::timeout(
            renew_every,
            lease.update(LEASE_KEY, replica.to_owned().into(), revision),
        )
        .await;
        match renewal {
            Ok(Ok(next)) => revision = next,
            Ok(Err(error)) => {
                warn!(%error, "lost the leader lease; standing by");
                break;
            }
            Err(_) => {
                warn!("renewing the leader lease timed out; standing by");
                break;
            }
        }
    }
    leading.cancel();
    term.send_replace(None);
}

/// Takes the lease if nobody holds it; returns its revision.
async fn acquire(lease: &kv::Store, replica: &str) -> Result<Option<u64>, kv::CreateError> {
    match lease.create(LEASE_KEY, replica.to_owned().into()).await {
        Ok(revision) => Ok(Some(revision)),
        Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(error) => Err(error),
    }
}
