//! The TaskService: reads tasks and streams their state changes.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{debug, instrument};
use vaas_proto::v1::task_service_server::TaskService;
use vaas_proto::v1::{
    GetTaskRequest, GetTaskResponse, ListTasksRequest, ListTasksResponse, Task, WatchTaskRequest,
    WatchTaskResponse,
};
use vaas_store::Store;

use crate::error::ApiError;
use crate::follow::{TaskFollower, is_terminal};

/// How many updates a slow watcher may have queued before the watch waits for it.
const WATCH_QUEUE: usize = 16;

/// The TaskService implementation.
#[derive(Clone, Debug)]
pub struct TaskApi {
    store: Store,
    follower: TaskFollower,
    watches: TaskTracker,
    shutdown: CancellationToken,
}

impl TaskApi {
    /// Creates the service; watches run on `watches` and end at `shutdown`.
    pub fn new(
        store: Store,
        follower: TaskFollower,
        watches: TaskTracker,
        shutdown: CancellationToken,
    ) -> TaskApi {
        TaskApi {
            store,
            follower,
            watches,
            shutdown,
        }
    }
}

/// Sends the task whenever it changes until it is terminal, the watcher leaves, or shutdown.
async fn watch(
    store: Store,
    follower: TaskFollower,
    mut events: crate::follow::TaskEvents,
    task_id: i64,
    sender: mpsc::Sender<Result<WatchTaskResponse, Status>>,
    shutdown: CancellationToken,
) {
    let mut last_sent: Option<Task> = None;
    loop {
        let task = match store.get_task(task_id).await {
            Ok(task) => task,
            Err(error) => {
                let _ = sender.send(Err(ApiError::from(error).into())).await;
                return;
            }
        };
        let changed = last_sent
            .as_ref()
            .is_none_or(|last| last.state != task.state || last.error != task.error);
        if changed {
            let terminal = is_terminal(&task);
            last_sent = Some(task.clone());
            if sender
                .send(Ok(WatchTaskResponse { task: Some(task) }))
                .await
                .is_err()
            {
                debug!(task = task_id, "watcher left");
                return;
            }
            if terminal {
                return;
            }
        }
        let far_future = Instant::now() + std::time::Duration::from_secs(3600);
        tokio::select! {
            () = follower.wait_for_change(&mut events, far_future) => {}
            // The caller went away: release its subscription now, not at the next change.
            () = sender.closed() => {
                debug!(task = task_id, "watcher left");
                return;
            }
            () = shutdown.cancelled() => {
                let _ = sender.send(Err(Status::unavailable("server is shutting down; watch again"))).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    type WatchTaskStream = Pin<Box<dyn Stream<Item = Result<WatchTaskResponse, Status>> + Send>>;

    #[instrument(skip_all, fields(rpc = "GetTask"))]
    async fn get_task(
        &self,
        request: Request<GetTaskRequest>,
    ) -> Result<Response<GetTaskResponse>, Status> {
        let task = self
            .store
            .get_task(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetTaskResponse { task: Some(task) }))
    }

    #[instrument(skip_all, fields(rpc = "ListTasks"))]
    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let request = request.into_inner();
        let (tasks, next_page_token) = self
            .store
            .list_tasks(
                request.page_size,
                &request.page_token,
                request.cluster_id,
                request.state,
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "WatchTask", task = request.get_ref().id))]
    async fn watch_task(
        &self,
        request: Request<WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let task_id = request.into_inner().id;
        let events = self.follower.subscribe(&[task_id]).await?;
        // Fails fast with NOT_FOUND instead of opening a stream for a task that does not exist.
        self.store.get_task(task_id).await.map_err(ApiError::from)?;
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        self.watches.spawn(watch(
            self.store.clone(),
            self.follower.clone(),
            events,
            task_id,
            sender,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
