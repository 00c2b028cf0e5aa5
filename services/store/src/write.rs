//! The write path every configuration change takes: one writer per store commits concurrent
//! writes together (group commit).
//!
//! A write is queued as a body; the writer runs queued bodies one after another inside one
//! database transaction, each in its own savepoint with its own store timestamp, and commits them
//! together: one commit (one fsync) for the batch instead of one per write. A body that fails is
//! rolled back to its savepoint alone and answered at once; the others commit. A body's caller
//! hears of success only once the batch has committed.
//!
//! The store clock is still taken by every write, inside the batch, so its row stays locked from
//! the batch's first write to its commit: batches of several API replicas commit in timestamp
//! order, and a snapshot that sees timestamp T sees every change up to T. Within a batch the
//! writes run one at a time, so a check-then-insert (uniqueness, references) sees every write
//! before it, as when each write was its own transaction.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{Acquire, AnyPool};
use tokio::sync::{mpsc, oneshot};
use vaas_proto::v1::Task;

use crate::resource::Tx;
use crate::{Dialect, Error, Result, Store, clock, tasks};

/// Most writes waiting for the writer; a caller beyond them waits to queue (backpressure).
pub const WRITE_QUEUE: usize = 1024;

/// Most writes committed together.
pub const MAX_BATCH_WRITES: usize = 256;

/// Longest a batch keeps taking queued writes before it commits: bounds how long the first write
/// of a batch waits for the others, and how long the batch holds the store clock.
pub const MAX_BATCH_TIME: Duration = Duration::from_millis(4);

/// The result of a write: the resource as stored and the reload tasks the write created.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome<T> {
    /// The resource as stored (unit for deletes).
    pub value: T,
    /// One reload task per affected cluster, in state PENDING.
    pub tasks: Vec<Task>,
}

/// One write inside its batch: its savepoint and its store timestamp.
pub(crate) struct Write<'a> {
    /// The savepoint the change, its tasks and outbox rows are written in.
    pub(crate) transaction: Tx<'a>,
    /// The store timestamp of the change and of its tasks.
    pub(crate) timestamp: i64,
    /// The request field of the first resource written that can change routing (routes,
    /// directors): set, the routing check runs on every affected cluster before the write ends.
    pub(crate) routing_changed: Option<&'static str>,
}

/// The handle on a store's writer task; the task ends when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: mpsc::Sender<Box<dyn QueuedWrite>>,
}

impl Writer {
    /// Starts the writer of `pool`.
    pub(crate) fn start(pool: AnyPool) -> Writer {
        let (queue, receiver) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(run_writer(pool, receiver));
        Writer { queue }
    }
}

/// A queued write with its body and the caller waiting for it, its types erased.
trait QueuedWrite: Send {
    /// Runs the body inside `batch` in its own savepoint; returns the answer to give once the
    /// batch commits, or nothing when the caller has been answered already (refused, or gone).
    fn run<'b>(
        self: Box<Self>,
        batch: &'b mut Tx<'static>,
    ) -> BoxFuture<'b, Option<Box<dyn Answer>>>;

    /// Answers the caller with `error` without running the body.
    fn refuse(self: Box<Self>, error: Error);
}

/// What a written body's caller is told once its batch has committed, or failed to.
trait Answer: Send {
    /// Answers the caller.
    fn give(self: Box<Self>, committed: std::result::Result<(), Arc<sqlx::Error>>);
}

/// A body waiting for the writer.
struct Queued<F, T, E> {
    body: F,
    reply: oneshot::Sender<std::result::Result<T, E>>,
    dialect: Dialect,
}

impl<F, T, E> QueuedWrite for Queued<F, T, E>
where
    F: for<'w, 'b> FnOnce(&'w mut Write<'b>) -> BoxFuture<'w, std::result::Result<T, E>>
        + Send
        + 'static,
    T: Send + 'static,
    E: From<Error> + Send + 'static,
{
    fn run<'b>(
        self: Box<Self>,
        batch: &'b mut Tx<'static>,
    ) -> BoxFuture<'b, Option<Box<dyn Answer>>> {
        Box::pin(async move {
            let Queued {
                body,
                reply,
                dialect,
            } = *self;
            // A caller that gave up before its write began gets no write.
            if reply.is_closed() {
                return None;
            }
            let savepoint = match batch.begin().await {
                Ok(savepoint) => savepoint,
                Err(error) => {
                    let _ = reply.send(Err(Error::from(error).into()));
                    return None;
                }
            };
            let mut write = Write {
                transaction: savepoint,
                timestamp: 0,
                routing_changed: None,
            };
            let outcome = async {
                write.timestamp = clock::tick(&mut write.transaction, dialect).await?;
                body(&mut write).await
            }
            .await;
            let outcome = match outcome {
                Ok(value) => match write.transaction.commit().await {
                    Ok(()) => Ok(value),
                    Err(error) => Err(Error::from(error).into()),
                },
                Err(error) => {
                    // Should the rollback fail, the batch's transaction is broken: the writes
                    // after this one fail, and so does the commit, which is then reported.
                    let _ = write.transaction.rollback().await;
                    Err(error)
                }
            };
            match outcome {
                Ok(value) => Some(Box::new(Written { reply, value }) as Box<dyn Answer>),
                Err(error) => {
                    let _ = reply.send(Err(error));
                    None
                }
            }
        })
    }

    fn refuse(self: Box<Self>, error: Error) {
        let _ = self.reply.send(Err(error.into()));
    }
}

/// A body that ran, its value held until the batch commits.
struct Written<T, E> {
    reply: oneshot::Sender<std::result::Result<T, E>>,
    value: T,
}

impl<T: Send, E: From<Error> + Send> Answer for Written<T, E> {
    fn give(self: Box<Self>, committed: std::result::Result<(), Arc<sqlx::Error>>) {
        let answer = match committed {
            Ok(()) => Ok(self.value),
            Err(error) => Err(Error::Commit(error).into()),
        };
        let _ = self.reply.send(answer);
    }
}

/// Takes queued writes in batches until every [`Writer`] handle is dropped.
async fn run_writer(pool: AnyPool, mut queue: mpsc::Receiver<Box<dyn QueuedWrite>>) {
    while let Some(first) = queue.recv().await {
        let mut batch = match pool.begin().await {
            Ok(batch) => batch,
            Err(error) => {
                first.refuse(Error::Database(error));
                continue;
            }
        };
        let opened = Instant::now();
        let mut answers = Vec::new();
        let mut ran = 0;
        let mut next = Some(first);
        while let Some(write) = next.take() {
            ran += 1;
            // A body that panics loses only itself: its savepoint rolls back as it unwinds and
            // its caller hears that the write was lost.
            if let Ok(Some(answer)) = AssertUnwindSafe(write.run(&mut batch)).catch_unwind().await {
                answers.push(answer);
            }
            if ran >= MAX_BATCH_WRITES || opened.elapsed() >= MAX_BATCH_TIME {
                break;
            }
            next = queue.try_recv().ok();
        }
        let committed = if answers.is_empty() {
            let _ = batch.rollback().await;
            Ok(())
        } else {
            batch.commit().await.map_err(Arc::new)
        };
        if let Err(error) = &committed {
            tracing::error!(%error, writes = answers.len(), "a batch of writes failed to commit");
        }
        for answer in answers {
            answer.give(committed.clone());
        }
    }
}

impl Store {
    /// Runs `body` as one write: in its own savepoint and with its own store timestamp, inside
    /// the writer's current batch; returns its value once the batch has committed. Nothing of a
    /// body that fails is saved.
    pub(crate) async fn write<T, E, F>(&self, body: F) -> std::result::Result<T, E>
    where
        F: for<'w, 'b> FnOnce(&'w mut Write<'b>) -> BoxFuture<'w, std::result::Result<T, E>>
            + Send
            + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let queued = Box::new(Queued {
            body,
            reply,
            dialect: self.dialect,
        });
        if self.writer.queue.send(queued).await.is_err() {
            return Err(Error::WriteLost.into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::WriteLost.into()))
    }

    /// Runs the routing check if the write changed routing, and creates tasks for the affected
    /// clusters that have a server to reload; the write ends when its body returns.
    pub(crate) async fn finish_write<T>(
        &self,
        write: &mut Write<'_>,
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
        Ok(WriteOutcome { value, tasks })
    }
}
