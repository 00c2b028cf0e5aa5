//! The reload decisions, free of I/O: which cluster to reload and when.
//!
//! Per cluster the machine remembers the newest intent it heard of, the store timestamp up to
//! which tasks are finished, and whether a reload runs. It starts a reload only when none runs
//! and something newer than what was applied is waiting, so reloads of one cluster never overlap
//! and a burst of changes costs one reload plus at most one more for what arrived meanwhile.

use std::collections::HashMap;

/// What the machine asks the scheduler to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reload this cluster from a fresh snapshot.
    StartReload {
        /// The cluster to reload.
        cluster_id: i64,
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
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ClusterState {
    newest_intent: i64,
    applied_up_to: i64,
    running: bool,
    resync_wanted: bool,
}

/// The reload state of every cluster the scheduler heard of.
#[derive(Clone, Debug, Default)]
pub struct ReloadMachine {
    clusters: HashMap<i64, ClusterState>,
}

impl ReloadMachine {
    /// Creates a machine that knows of no cluster.
    pub fn new() -> ReloadMachine {
        ReloadMachine::default()
    }

    /// Records that the cluster has a change up to `timestamp` to apply.
    pub fn on_intent(&mut self, cluster_id: i64, timestamp: i64) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.newest_intent = state.newest_intent.max(timestamp);
        Self::next(cluster_id, state)
    }

    /// Records that a server of the cluster may not run what the store says (its agent just
    /// attached, for example after varnishd restarted empty): reload once even without a new
    /// intent. A reload already running may have started before the server came back, so the
    /// request waits for it to end.
    pub fn on_resync(&mut self, cluster_id: i64) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.resync_wanted = true;
        Self::next(cluster_id, state)
    }

    /// Records the end of the cluster's running reload.
    pub fn on_reload_end(&mut self, cluster_id: i64, end: ReloadEnd) -> Vec<Action> {
        let state = self.clusters.entry(cluster_id).or_default();
        state.running = false;
        match end {
            ReloadEnd::Finished { snapshot_version } => {
                state.applied_up_to = state.applied_up_to.max(snapshot_version);
                Self::next(cluster_id, state)
            }
            ReloadEnd::Interrupted => Vec::new(),
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
        let behind = state.newest_intent > state.applied_up_to;
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
                        let Action::StartReload { cluster_id } = action;
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
                        let Action::StartReload { cluster_id } = action;
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
                    let Action::StartReload { cluster_id } = action;
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
