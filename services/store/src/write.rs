//! The write transaction every configuration change runs in: it takes the next store timestamp
//! first (which serialises writers), and commits the change together with one reload task and
//! outbox row per affected cluster that has a server to reload.

use std::collections::BTreeSet;

use vaas_proto::v1::Task;

use crate::resource::Tx;
use crate::{Error, Result, Store, clock, tasks};

/// The result of a write: the resource as stored and the reload tasks the write created.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome<T> {
    /// The resource as stored (unit for deletes).
    pub value: T,
    /// One reload task per affected cluster, in state PENDING.
    pub tasks: Vec<Task>,
}

/// An open write transaction with its store timestamp.
pub(crate) struct Write<'a> {
    /// The transaction the change, its tasks and outbox rows are written in.
    pub(crate) transaction: Tx<'a>,
    /// The store timestamp of the change and of its tasks.
    pub(crate) timestamp: i64,
    /// The request field of the first resource written that can change routing (routes,
    /// directors): set, the routing check runs on every affected cluster before the commit.
    pub(crate) routing_changed: Option<&'static str>,
}

impl Store {
    /// Opens a write transaction and takes its store timestamp.
    pub(crate) async fn begin_write(&self) -> Result<Write<'static>> {
        let mut transaction = self.pool.begin().await?;
        let timestamp = clock::tick(&mut transaction, self.dialect).await?;
        Ok(Write {
            transaction,
            timestamp,
            routing_changed: None,
        })
    }

    /// Creates tasks for the affected clusters that have a server to reload, then commits.
    pub(crate) async fn commit_write<T>(
        &self,
        mut write: Write<'_>,
        value: T,
        affected_clusters: BTreeSet<i64>,
        description: String,
    ) -> Result<WriteOutcome<T>> {
        if let (Some(field), Some(check)) = (write.routing_changed, &self.routing_check) {
            for &cluster_id in &affected_clusters {
                let snapshot =
                    crate::snapshot::read(&mut write.transaction, cluster_id, write.timestamp)
                        .await?;
                check.run(&snapshot).map_err(|reason| Error::Invalid {
                    field: field.to_owned(),
                    reason,
                })?;
            }
        }
        let mut tasks = Vec::with_capacity(affected_clusters.len());
        for cluster_id in affected_clusters {
            tasks.extend(
                tasks::create_for_served_cluster(
                    &mut write.transaction,
                    self.dialect,
                    cluster_id,
                    write.timestamp,
                    &description,
                )
                .await?,
            );
        }
        write.transaction.commit().await?;
        Ok(WriteOutcome { value, tasks })
    }
}
