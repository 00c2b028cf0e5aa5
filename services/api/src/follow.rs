//! Following tasks until they finish (and clusters as their reloads go): subscribe to their
//! events first, then read the store, so no change between the two is missed; re-read on every
//! event and at a steady interval in case an event was lost (events are plain NATS messages, at
//! most once).

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use vaas_proto::v1::{Task, TaskState};
use vaas_store::Store;

use crate::error::ApiError;

/// Returns true when a task will not change any more.
pub fn is_terminal(task: &Task) -> bool {
    matches!(
        TaskState::try_from(task.state),
        Ok(TaskState::Success | TaskState::Failure | TaskState::Revoked)
    )
}

/// Follows tasks through NATS events and the store.
#[derive(Clone, Debug)]
pub struct TaskFollower {
    nats: async_nats::Client,
    store: Store,
    recheck_interval: Duration,
}

/// A live subscription to the events of some tasks.
pub struct TaskEvents {
    events: futures::stream::SelectAll<async_nats::Subscriber>,
}

impl TaskEvents {
    /// Waits for the next event, at most until `deadline`; returns false at the deadline.
    pub async fn next_before(&mut self, deadline: Instant) -> bool {
        tokio::select! {
            event = self.events.next() => event.is_some(),
            () = tokio::time::sleep_until(deadline) => false,
        }
    }
}

impl TaskFollower {
    /// Creates a follower that re-reads the store at least every `recheck_interval`.
    pub fn new(nats: async_nats::Client, store: Store, recheck_interval: Duration) -> TaskFollower {
        TaskFollower {
            nats,
            store,
            recheck_interval,
        }
    }

    /// Subscribes to the events of these tasks; read the store only after this returns.
    pub async fn subscribe(&self, task_ids: &[i64]) -> Result<TaskEvents, ApiError> {
        let mut subscribers = Vec::with_capacity(task_ids.len());
        for &task_id in task_ids {
            subscribers.push(
                self.nats
                    .subscribe(vaas_bus::task_event_subject(task_id))
                    .await?,
            );
        }
        Ok(TaskEvents {
            events: futures::stream::select_all(subscribers),
        })
    }

    /// Adds the reload progress events of a cluster to `events`; read the store only after this
    /// returns.
    pub async fn follow_cluster(
        &self,
        events: &mut TaskEvents,
        cluster_id: i64,
    ) -> Result<(), ApiError> {
        events.events.push(
            self.nats
                .subscribe(vaas_bus::cluster_event_subject(cluster_id))
                .await?,
        );
        Ok(())
    }

    /// Returns when the next re-read is due: after an event, or the recheck interval, or the
    /// deadline, whichever comes first.
    pub async fn wait_for_change(&self, events: &mut TaskEvents, deadline: Instant) {
        let recheck = (Instant::now() + self.recheck_interval).min(deadline);
        events.next_before(recheck).await;
    }

    /// Waits until every task is terminal or `deadline` passes; returns the tasks as last read.
    pub async fn wait_until_finished(
        &self,
        task_ids: &[i64],
        deadline: Instant,
    ) -> Result<Vec<Task>, ApiError> {
        let mut events = self.subscribe(task_ids).await?;
        loop {
            let tasks = self.store.get_tasks(task_ids).await?;
            if tasks.iter().all(is_terminal) || Instant::now() >= deadline {
                return Ok(tasks);
            }
            self.wait_for_change(&mut events, deadline).await;
        }
    }
}
