//! The reload decisions, free of I/O: which cluster to reload and when.
//!
//! Per cluster the machine remembers the newest intent it heard of, the store timestamp up to
//! which tasks are finished, and whether a reload runs. It starts a reload only when none runs
//! and something newer than what was applied is waiting, so reloads of one cluster never overlap
//! and a burst of changes costs one reload plus at most one more for what arrived meanwhile.
//!
//! A reload that failed for a transient reason (an agent unreachable, gone or too slow) is tried
//! again after a growing delay, up to a number of attempts; an agent that attaches (the news a
//! retry waits for) starts the next attempt at once. A newer change waits for the delay too: in
//! a burst during an outage, changes arrive every few milliseconds, and letting each start an
//! attempt would spend every attempt before the outage could pass. A deterministic failure (a
//! compile error) is final.

use std::collections::HashMap;
use std::time::Duration;

/// What the machine asks the scheduler to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reload this cluster from a fresh snapshot.
    StartReload {
        /// The cluster to reload.
        cluster_id: i64,
    },
    /// Call [`ReloadMachine::on_retry_due`] for this cluster after `delay`.
    RetryLater {
        /// The cluster whose reload failed transiently.
        cluster_id: i64,
        /// How long to wait.
        delay: Duration,
    },
}

/// How a reload ended, as far as the machine cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadEnd {
    /// Tasks up to `snapshot_version` are finished (succeeded or failed).
    Finished {
        /// The store timestamp of the snapshot the reload used.
        snapshot_version: i64,
    },
    /// The reload could not run (store unreachable…); nothing was finished. Reconciliation
    /// brings the cluster back later instead of retrying in a tight loop.
    Interrupted,
    /// The reload failed transiently; its tasks wait in state RETRY for the next attempt.
    Retry,
}

/// How often and how patiently a transiently failed reload is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; the last one's failure is final.
    pub attempts: u32,
    /// Delay before the second attempt; each later one waits twice as long.
    pub first_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ClusterState {
    newest_intent: i64,
    applied_up_to: i64,
    running: bool,
    resync_wanted: bool,
    /// Transient failures in a row.
    failed_attempts: u32,
    /// Waiting for the delay after a transient failure: old intents do not start a reload.
    retry_waiting: bool,
}

/// The reload state of every cluster the scheduler heard of.
#[derive(Clone, Debug, Default)]
pub struct ReloadMachine {
    clusters: HashMap<i64, ClusterState>,
    retries: RetryPolicy,
}

impl ReloadMachine {
    /// Creates a machine that knows of no cluster, with the default retry policy.
    pub fn new() -> ReloadMachine {
        ReloadMachine::default()
    }

    /// Creates a machine that retries transient failures as `retries` says.
    pub fn with_retries(retries: RetryPolicy) -> ReloadMachine {
        ReloadMachine {
            clusters: HashMap::new(),
            retries,
        }
    }

    /// Records that the cluster has a change up to `timestamp` to apply. During the wait for a
    /// retry it is applied by the next attempt, when the delay has passed.
    pub fn on_intent(&mut self, cluster_id: i64, timestamp: i64) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.newest_intent = state.newest_intent.max(timestamp);
        Self::next(cluster_id, state)
    }

    /// Records that the delay after a transient failure has passed.
    pub fn on_retry_due(&mut self, cluster_id: i64) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.retry_waiting = false;
        Self::next(cluster_id, state)
    }

    /// Returns whether the cluster's next reload is its last attempt: a transient failure of it
    /// is final.
    pub fn is_last_attempt(&self, cluster_id: i64) -> bool {
        let failed = self
            .clusters
            .get(&cluster_id)
            .map_or(0, |state| state.failed_attempts);
        failed + 1 >= self.retries.attempts
    }

    /// Records that a server of the cluster may not run what the store says (its agent just
    /// attached, for example after varnishd restarted empty): reload once even without a new
    /// intent. A reload already running may have started before the server came back, so the
    /// request waits for it to end.
    pub fn on_resync(&mut self, cluster_id: i64) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.resync_wanted = true;
        // An agent that came back is the news a retry waits for.
        state.retry_waiting = false;
        Self::next(cluster_id, state)
    }

    /// Records the end of the cluster's running reload.
    pub fn on_reload_end(&mut self, cluster_id: i64, end: ReloadEnd) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.running = false;
        match end {
            ReloadEnd::Finished { snapshot_version } => {
                state.failed_attempts = 0;
                state.applied_up_to = state.applied_up_to.max(snapshot_version);
                Self::next(cluster_id, state)
            }
            ReloadEnd::Interrupted => Vec::new(),
            ReloadEnd::Retry => {
                state.failed_attempts += 1;
                if state.resync_wanted {
                    // An agent attached while the attempt ran: try again at once.
                    return Self::next(cluster_id, state);
                }
                state.retry_waiting = true;
                let doublings = state.failed_attempts.saturating_sub(1).min(16);
                let delay = self
                    .retries
                    .first_delay
                    .saturating_mul(1 << doublings)
                    .min(self.retries.max_delay);
                vec![Action::RetryLater { cluster_id, delay }]
            }
        }
    }

    /// Returns true while a reload of the cluster runs.
    pub fn is_running(&self, cluster_id: i64) -> bool {
        self.clusters
            .get(&cluster_id)
            .is_some_and(|state| state.running)
    }

    /// Returns the number of reloads running.
    pub fn running_count(&self) -> usize {
        self.clusters.values().filter(|state| state.running).count()
    }

    fn next(cluster_id: i64, state: &mut ClusterState) -> Vec<Action> {
        let behind = state.newest_intent > state.applied_up_to && !state.retry_waiting;
        if state.running || !(behind || state.resync_wanted) {
            return Vec::new();
        }
        state.running = true;
        state.resync_wanted = false;
        vec![Action::StartReload { cluster_id }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROD: i64 = 1;

    #[test]
    fn an_intent_starts_one_reload_and_newer_ones_wait_for_it() {
        let mut machine = ReloadMachine::new();
        assert_eq!(
            machine.on_intent(PROD, 10),
            vec![Action::StartReload { cluster_id: PROD }]
        );
        assert!(
            machine.on_intent(PROD, 11).is_empty(),
            "one reload per cluster at a time"
        );
        assert!(machine.on_intent(PROD, 12).is_empty());
        // The running reload's snapshot saw up to 10 only: one more reload covers 11 and 12.
        let next = machine.on_reload_end(
            PROD,
            ReloadEnd::Finished {
                snapshot_version: 10,
            },
        );
        assert_eq!(next, vec![Action::StartReload { cluster_id: PROD }]);
        assert!(
            machine
                .on_reload_end(
                    PROD,
                    ReloadEnd::Finished {
                        snapshot_version: 12
                    }
                )
                .is_empty()
        );
        assert!(!machine.is_running(PROD));
    }

    #[test]
    fn intents_already_applied_are_ignored() {
        let mut machine = ReloadMachine::new();
        machine.on_intent(PROD, 10);
        machine.on_reload_end(
            PROD,
            ReloadEnd::Finished {
                snapshot_version: 15,
            },
        );
        assert!(
            machine.on_intent(PROD, 12).is_empty(),
            "a snapshot at 15 covered 12"
        );
        assert!(machine.on_intent(PROD, 15).is_empty());
        assert_eq!(
            machine.on_intent(PROD, 16),
            vec![Action::StartReload { cluster_id: PROD }]
        );
    }

    #[test]
    fn a_resync_reloads_once_even_without_a_new_intent() {
        let mut machine = ReloadMachine::new();
        machine.on_intent(PROD, 10);
        machine.on_reload_end(
            PROD,
            ReloadEnd::Finished {
                snapshot_version: 10,
            },
        );
        assert_eq!(
            machine.on_resync(PROD),
            vec![Action::StartReload { cluster_id: PROD }]
        );
        assert!(
            machine.on_resync(PROD).is_empty(),
            "asked again while running: waits"
        );
        let next = machine.on_reload_end(
            PROD,
            ReloadEnd::Finished {
                snapshot_version: 10,
            },
        );
        assert_eq!(
            next,
            vec![Action::StartReload { cluster_id: PROD }],
            "the waiting resync"
        );
        assert!(
            machine
                .on_reload_end(
                    PROD,
                    ReloadEnd::Finished {
                        snapshot_version: 10
                    }
                )
                .is_empty()
        );
    }

    #[test]
    fn clusters_reload_independently() {
        let mut machine = ReloadMachine::new();
        assert_eq!(machine.on_intent(1, 5).len(), 1);
        assert_eq!(machine.on_intent(2, 6).len(), 1);
        assert_eq!(machine.running_count(), 2);
    }

    #[test]
    fn an_interrupted_reload_waits_for_the_next_intent() {
        let mut machine = ReloadMachine::new();
        machine.on_intent(PROD, 10);
        assert!(
            machine
                .on_reload_end(PROD, ReloadEnd::Interrupted)
                .is_empty()
        );
        assert_eq!(
            machine.on_intent(PROD, 10),
            vec![Action::StartReload { cluster_id: PROD }]
        );
    }

    #[test]
    fn a_transient_failure_is_retried_later_with_growing_delays_then_given_up() {
        let policy = RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        };
        let mut machine = ReloadMachine::with_retries(policy);
        machine.on_intent(PROD, 10);
        assert!(!machine.is_last_attempt(PROD));
        assert_eq!(
            machine.on_reload_end(PROD, ReloadEnd::Retry),
            vec![Action::RetryLater {
                cluster_id: PROD,
                delay: Duration::from_secs(1)
            }]
        );
        assert!(
            machine.on_intent(PROD, 10).is_empty(),
            "the scan of unfinished tasks waits for the delay"
        );
        assert_eq!(
            machine.on_retry_due(PROD),
            vec![Action::StartReload { cluster_id: PROD }]
        );
        assert_eq!(
            machine.on_reload_end(PROD, ReloadEnd::Retry),
            vec![Action::RetryLater {
                cluster_id: PROD,
                delay: Duration::from_secs(2)
            }]
        );
        machine.on_retry_due(PROD);
        assert!(machine.is_last_attempt(PROD), "the third of three");
        // The last attempt finishes the tasks (as failed); the count starts again.
        machine.on_reload_end(
            PROD,
            ReloadEnd::Finished {
                snapshot_version: 10,
            },
        );
        assert!(!machine.is_last_attempt(PROD));
    }

    #[test]
    fn a_newer_change_waits_for_the_retry_but_an_agent_coming_back_ends_the_wait() {
        let mut machine = ReloadMachine::new();
        machine.on_intent(PROD, 10);
        machine.on_reload_end(PROD, ReloadEnd::Retry);
        for timestamp in 11..100 {
            assert!(
                machine.on_intent(PROD, timestamp).is_empty(),
                "a burst during an outage does not spend the attempts"
            );
        }
        assert!(!machine.is_last_attempt(PROD));
        assert_eq!(
            machine.on_retry_due(PROD),
            vec![Action::StartReload { cluster_id: PROD }]
        );
        machine.on_reload_end(PROD, ReloadEnd::Retry);
        assert_eq!(
            machine.on_resync(PROD),
            vec![Action::StartReload { cluster_id: PROD }]
        );
        assert!(
            machine.on_retry_due(PROD).is_empty(),
            "a late timer while the attempt runs starts nothing"
        );
    }

    /// Replays random interleavings of intents and reload ends, with snapshots that see any
    /// timestamp published so far, and checks the two promises: never two reloads of a cluster at
    /// once, and when everything has settled, the newest intent is applied.
    #[test]
    fn random_interleavings_keep_the_promises() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut random = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for _ in 0..500 {
            let mut machine = ReloadMachine::new();
            let mut clock = 0;
            let mut running: HashMap<i64, i64> = HashMap::new();
            let mut newest: HashMap<i64, i64> = HashMap::new();
            for _ in 0..60 {
                let cluster = random(3) as i64;
                if random(2) == 0 {
                    clock += 1;
                    newest.insert(cluster, clock);
                    for action in machine.on_intent(cluster, clock) {
                        let Action::StartReload { cluster_id } = action else {
                            panic!("no failure, no retry: {action:?}");
                        };
                        assert!(
                            running.insert(cluster_id, clock).is_none(),
                            "overlapping reloads"
                        );
                    }
                } else if running.remove(&cluster).is_some() {
                    let end = ReloadEnd::Finished {
                        snapshot_version: clock,
                    };
                    for action in machine.on_reload_end(cluster, end) {
                        let Action::StartReload { cluster_id } = action else {
                            panic!("no failure, no retry: {action:?}");
                        };
                        assert!(
                            running.insert(cluster_id, clock).is_none(),
                            "overlapping reloads"
                        );
                    }
                }
            }
            // Let every running reload finish with a snapshot of everything, until quiet.
            while let Some((&cluster, _)) = running.iter().next() {
                running.remove(&cluster);
                let end = ReloadEnd::Finished {
                    snapshot_version: clock,
                };
                for action in machine.on_reload_end(cluster, end) {
                    let Action::StartReload { cluster_id } = action else {
                        panic!("no failure, no retry: {action:?}");
                    };
                    running.insert(cluster_id, clock);
                }
            }
            for (cluster, timestamp) in newest {
                assert!(
                    machine.on_intent(cluster, timestamp).is_empty(),
                    "newest intent applied"
                );
            }
        }
    }
}
