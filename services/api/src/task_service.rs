//! The TaskService (reads tasks and streams their state changes) and the StatusService (streams
//! what a cluster's servers run and how its reloads go, and explains where a server sends a
//! request).

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{debug, instrument};
use vaas_proto::v1::status_service_server::StatusService;
use vaas_proto::v1::task_service_server::TaskService;
use vaas_proto::v1::{
    Cluster, ExplainRequest, ExplainResponse, GetTaskRequest, GetTaskResponse, ListTasksRequest,
    ListTasksResponse, ListVarnishServersRequest, VarnishServer, WatchClusterRequest,
    WatchClusterResponse, WatchTaskRequest, WatchTaskResponse,
};
use vaas_store::Store;

use crate::error::ApiError;
use crate::follow::{TaskFollower, is_terminal};

/// How many updates a slow watcher may have queued before the watch waits for it.
const WATCH_QUEUE: usize = 16;

/// The largest page the store hands out, used to read all of a cluster's servers.
const MAX_PAGE_SIZE: i32 = 1000;

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

/// Sends what `read` returns now and whenever it changes (re-read after every event and at the
/// follower's interval) until `is_final` holds for what was sent, the watcher leaves, or
/// shutdown. A failed read ends the watch with its error.
async fn send_changes<T, Read, Reading>(
    mut read: Read,
    is_final: impl Fn(&T) -> bool,
    follower: TaskFollower,
    mut events: crate::follow::TaskEvents,
    sender: mpsc::Sender<Result<T, Status>>,
    shutdown: CancellationToken,
) where
    T: Clone + PartialEq,
    Read: FnMut() -> Reading,
    Reading: Future<Output = Result<T, ApiError>>,
{
    let mut last_sent: Option<T> = None;
    loop {
        let now = match read().await {
            Ok(now) => now,
            Err(error) => {
                let _ = sender.send(Err(error.into())).await;
                return;
            }
        };
        if last_sent.as_ref() != Some(&now) {
            let finished = is_final(&now);
            last_sent = Some(now.clone());
            if sender.send(Ok(now)).await.is_err() {
                debug!("watcher left");
                return;
            }
            if finished {
                return;
            }
        }
        let far_future = Instant::now() + std::time::Duration::from_secs(3600);
        tokio::select! {
            () = follower.wait_for_change(&mut events, far_future) => {}
            // The caller went away: release its subscription now, not at the next change.
            () = sender.closed() => {
                debug!("watcher left");
                return;
            }
            () = shutdown.cancelled() => {
                let _ = sender.send(Err(Status::unavailable("server is shutting down; watch again"))).await;
                return;
            }
        }
    }
}

/// A cluster as WatchCluster shows it: its servers and their progress in its newest reload.
async fn cluster_status(store: &Store, cluster_id: i64) -> Result<WatchClusterResponse, ApiError> {
    let cluster = store.get::<Cluster>(cluster_id).await?;
    let filter = ListVarnishServersRequest {
        cluster_id,
        ..Default::default()
    };
    let mut servers = Vec::new();
    let mut page_token = String::new();
    loop {
        let (page, next) = store
            .list::<VarnishServer>(&filter, MAX_PAGE_SIZE, &page_token)
            .await?;
        servers.extend(page);
        if next.is_empty() {
            break;
        }
        page_token = next;
    }
    let (reload_timestamp, reload_servers) = match store.newest_reload_progress(cluster_id).await? {
        Some((reloaded, progress)) => (Some(reloaded), progress),
        None => (None, Vec::new()),
    };
    Ok(WatchClusterResponse {
        cluster: Some(cluster),
        servers,
        reload_timestamp,
        reload_servers,
    })
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
        let mut events = self.follower.subscribe(&[task_id]).await?;
        // Fails fast with NOT_FOUND instead of opening a stream for a task that does not exist.
        let task = self.store.get_task(task_id).await.map_err(ApiError::from)?;
        // Per-server progress changes without a task event.
        self.follower
            .follow_cluster(&mut events, task.cluster_id)
            .await?;
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        let store = self.store.clone();
        self.watches.spawn(send_changes(
            move || {
                let store = store.clone();
                async move {
                    let task = store.get_task(task_id).await?;
                    Ok(WatchTaskResponse { task: Some(task) })
                }
            },
            |response: &WatchTaskResponse| response.task.as_ref().is_some_and(is_terminal),
            self.follower.clone(),
            events,
            sender,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

#[tonic::async_trait]
impl StatusService for TaskApi {
    type WatchClusterStream =
        Pin<Box<dyn Stream<Item = Result<WatchClusterResponse, Status>> + Send>>;

    #[instrument(skip_all, fields(rpc = "WatchCluster", cluster = request.get_ref().cluster_id))]
    async fn watch_cluster(
        &self,
        request: Request<WatchClusterRequest>,
    ) -> Result<Response<Self::WatchClusterStream>, Status> {
        let cluster_id = request.into_inner().cluster_id;
        let mut events = self.follower.subscribe(&[]).await?;
        self.follower
            .follow_cluster(&mut events, cluster_id)
            .await?;
        // Fails fast with NOT_FOUND instead of opening a stream for a cluster that does not exist.
        self.store
            .get::<Cluster>(cluster_id)
            .await
            .map_err(ApiError::from)?;
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        let store = self.store.clone();
        self.watches.spawn(send_changes(
            move || {
                let store = store.clone();
                async move { cluster_status(&store, cluster_id).await }
            },
            |_: &WatchClusterResponse| false,
            self.follower.clone(),
            events,
            sender,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[instrument(skip_all, fields(rpc = "Explain", server = request.get_ref().server_id))]
    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let response = crate::explain::explain(&self.store, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}
