//! Leader election among scheduler replicas through the lease in the store.
//!
//! The store is the truth, so it also says who leads: NATS can go away without anyone losing
//! leadership. The leader renews the lease every third of its time to live; the others try to
//! take it at the same pace, which succeeds only once it was released (on shutdown) or expired
//! (a crashed or cut-off leader). Every take starts a new term, numbered higher than every
//! earlier one: the fencing token of the leader's commands.
//!
//! A renewal that finds the lease taken steps down at once. A renewal that fails (the store does
//! not answer) is tried again, a few times a second, until the lease could have expired; only
//! then does the leader step down, a margin before the store's expiry, so two replicas never
//! drive reloads at once and a blip of the store does not hand leadership around.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vaas_store::Store;

/// The longest pause between two attempts at a renewal that failed.
const RENEWAL_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Time allowed to give the lease back at shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Who takes part in the election, and for how long a lease lasts.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The store holding the lease.
    pub store: Store,
    /// This replica's name in the lease; unique among the replicas.
    pub replica: String,
    /// How long a lease lasts unless it is renewed.
    pub lease_ttl: Duration,
}

impl Candidate {
    /// Returns how often the lease is renewed (and how often a standby tries to take it).
    fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }

    /// Returns how long before the store's expiry the leader steps down when it cannot renew:
    /// room for clocks that run at slightly different rates and for reloads to stop.
    fn step_down_margin(&self) -> Duration {
        self.lease_ttl / 10
    }
}

/// Runs the election until `shutdown`. While this replica leads, `term` holds a token that is
/// cancelled the moment it stops leading; otherwise it holds `None`. `term_number` holds the
/// number of this replica's newest term (0 before its first); it is set before the term's token
/// is published, so a reader that sees a token can read the number that fences its commands.
pub async fn run_election(
    candidate: Candidate,
    term: watch::Sender<Option<CancellationToken>>,
    term_number: watch::Sender<i64>,
    shutdown: CancellationToken,
) {
    let renew_every = candidate.renew_every();
    while !shutdown.is_cancelled() {
        let sent = Instant::now();
        match candidate
            .store
            .acquire_leader_lease(&candidate.replica, candidate.lease_ttl)
            .await
        {
            Ok(Some(number)) => {
                term_number.send_replace(number);
                lead(&candidate, number, sent, &term, &shutdown).await;
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot reach the leader lease in the store"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(renew_every) => {}
        }
    }
}

/// Holds the lease of term `number`, taken by a statement sent at `sent`, renewing it until
/// shutdown (then releases it), until another replica holds it, or until it could have expired.
async fn lead(
    candidate: &Candidate,
    number: i64,
    sent: Instant,
    term: &watch::Sender<Option<CancellationToken>>,
    shutdown: &CancellationToken,
) {
    let replica = candidate.replica.as_str();
    let renew_every = candidate.renew_every();
    let lease_ttl = candidate.lease_ttl;
    // The store's expiry is at least `lease_ttl` after the statement was sent.
    let mut step_down_at = sent + lease_ttl - candidate.step_down_margin();
    let mut next_renewal = sent + renew_every;
    let leading = shutdown.child_token();
    term.send_replace(Some(leading.clone()));
    info!(
        replica,
        term = number,
        "leading: this replica drives reloads"
    );
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                stop_leading(term, &leading);
                // Releasing lets a standby take over now instead of after the lease expires.
                let release = tokio::time::timeout(
                    RELEASE_TIMEOUT,
                    candidate.store.release_leader_lease(replica, number),
                );
                match release.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => warn!(%error, "cannot release the leader lease"),
                    Err(_) => warn!("releasing the leader lease timed out"),
                }
                return;
            }
            () = tokio::time::sleep_until(next_renewal.min(step_down_at)) => {}
        }
        let now = Instant::now();
        if now >= step_down_at {
            warn!(
                term = number,
                failures, "cannot renew the leader lease before it expires; standing by"
            );
            break;
        }
        let renewal = tokio::time::timeout_at(
            step_down_at,
            candidate
                .store
                .renew_leader_lease(replica, number, lease_ttl),
        );
        match renewal.await {
            Ok(Ok(true)) => {
                failures = 0;
                step_down_at = now + lease_ttl - candidate.step_down_margin();
                next_renewal = now + renew_every;
            }
            Ok(Ok(false)) => {
                warn!(
                    term = number,
                    "another replica holds the leader lease; standing by"
                );
                break;
            }
            Ok(Err(error)) => {
                failures = failures.saturating_add(1);
                warn!(%error, term = number, failures, "renewing the leader lease failed; retrying");
                next_renewal = Instant::now() + RENEWAL_RETRY_PAUSE.min(renew_every);
            }
            // The loop steps down on its next turn.
            Err(_) => failures = failures.saturating_add(1),
        }
    }
    stop_leading(term, &leading);
}

/// Ends a term: `None` is published before the token is cancelled, so whoever wakes up on the
/// cancellation already finds no term in the watch.
fn stop_leading(term: &watch::Sender<Option<CancellationToken>>, leading: &CancellationToken) {
    term.send_replace(None);
    leading.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> anyhow::Result<(Store, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("vaas.db").display());
        Ok((Store::connect(&url).await?, dir))
    }

    /// Waits until `terms` holds a term (or none), within a generous bound.
    async fn wait_for(
        terms: &mut watch::Receiver<Option<CancellationToken>>,
        leading: bool,
    ) -> anyhow::Result<Option<CancellationToken>> {
        let term = tokio::time::timeout(
            Duration::from_secs(10),
            terms.wait_for(|term| term.is_some() == leading),
        )
        .await??;
        Ok(term.clone())
    }

    #[tokio::test]
    async fn one_replica_leads_and_the_other_takes_over_with_a_higher_term_when_it_stops()
    -> anyhow::Result<()> {
        let (store, _dir) = store().await?;
        let lease_ttl = Duration::from_millis(600);
        let mut shutdowns = Vec::new();
        let mut watches = Vec::new();
        for index in 0..2 {
            let (terms, numbers, shutdown) =
                elect(&format!("scheduler-{index}"), &store, lease_ttl);
            shutdowns.push(shutdown);
            watches.push((terms, numbers));
            // The first one leads before the second starts.
            if index == 0 {
                wait_for(&mut watches[0].0, true).await?;
            }
        }
        // Several renewals later the first still leads, alone.
        tokio::time::sleep(lease_ttl * 2).await;
        assert!(watches[0].0.borrow().is_some());
        assert!(watches[1].0.borrow().is_none());
        let first_term = *watches[0].1.borrow();
        assert_eq!(
            store.leader_lease().await?.map(|lease| lease.term),
            Some(first_term)
        );

        let first_token = watches[0].0.borrow().clone().expect("leading");
        shutdowns[0].cancel();
        first_token.cancelled().await;
        let second_token = wait_for(&mut watches[1].0, true).await?.expect("leading");
        let second_term = *watches[1].1.borrow();
        assert!(second_term > first_term, "{second_term} after {first_term}");
        assert!(!second_token.is_cancelled());
        shutdowns[1].cancel();
        second_token.cancelled().await;
        Ok(())
    }

    /// Runs the election of `replica` in the background; returns its term and term-number
    /// watches and the token that stops it.
    fn elect(
        replica: &str,
        store: &Store,
        lease_ttl: Duration,
    ) -> (
        watch::Receiver<Option<CancellationToken>>,
        watch::Receiver<i64>,
        CancellationToken,
    ) {
        let shutdown = CancellationToken::new();
        let (term, terms) = watch::channel(None);
        let (number, numbers) = watch::channel(0);
        tokio::spawn(run_election(
            Candidate {
                store: store.clone(),
                replica: replica.to_owned(),
                lease_ttl,
            },
            term,
            number,
            shutdown.clone(),
        ));
        (terms, numbers, shutdown)
    }

    #[tokio::test]
    async fn a_leader_whose_lease_was_taken_steps_down_once() -> anyhow::Result<()> {
        let (store, _dir) = store().await?;
        let lease_ttl = Duration::from_millis(600);
        let (mut terms, numbers, shutdown) = elect("scheduler-0", &store, lease_ttl);
        let token = wait_for(&mut terms, true).await?.expect("leading");
        // Another replica's term, as if this one had been paused past its lease.
        let taken = *numbers.borrow();
        assert!(store.release_leader_lease("scheduler-0", taken).await?);
        assert!(
            store
                .acquire_leader_lease("intruder", Duration::from_secs(60))
                .await?
                .is_some()
        );
        tokio::time::timeout(Duration::from_secs(5), token.cancelled()).await?;
        assert!(terms.borrow_and_update().is_none());
        // It stays a standby (the intruder's lease lasts a minute) instead of flapping.
        let mut changes = 0;
        let watching = tokio::time::timeout(lease_ttl * 3, async {
            while terms.changed().await.is_ok() {
                changes += 1;
            }
        });
        let _ = watching.await;
        assert_eq!(changes, 0, "leadership flipped while the lease was taken");
        shutdown.cancel();
        Ok(())
    }

    #[tokio::test]
    async fn a_store_that_stops_answering_ends_leadership_once_when_the_lease_could_expire()
    -> anyhow::Result<()> {
        let (store, _dir) = store().await?;
        let lease_ttl = Duration::from_millis(900);
        let (mut terms, _numbers, shutdown) = elect("scheduler-0", &store, lease_ttl);
        let token = wait_for(&mut terms, true).await?.expect("leading");
        // Every statement fails from now on.
        store.close().await;
        let closed = Instant::now();
        tokio::time::timeout(lease_ttl * 2, token.cancelled()).await?;
        let held = closed.elapsed();
        assert!(
            held >= lease_ttl / 2,
            "stepped down after {held:?} of errors"
        );
        assert!(terms.borrow_and_update().is_none());
        let mut changes = 0;
        let watching = tokio::time::timeout(lease_ttl * 3, async {
            while terms.changed().await.is_ok() {
                changes += 1;
            }
        });
        let _ = watching.await;
        assert_eq!(changes, 0, "leadership flipped while the store was down");
        shutdown.cancel();
        Ok(())
    }
}
