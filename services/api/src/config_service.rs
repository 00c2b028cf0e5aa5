//! The ConfigService: validates writes, stores them with their reload tasks, and answers after
//! the reloads (by default) or at once (`prefer: respond-async`).
//!
//! The RPC methods are uniform per resource; what differs between synchronous and asynchronous
//! writes lives in [`ConfigApi::settle`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use vaas_proto::v1::config_service_server::ConfigService;
use vaas_proto::v1::{
    CreateBackendRequest, CreateBackendResponse, CreateClusterRequest, CreateClusterResponse,
    CreateDcRequest, CreateDcResponse, CreateDirectorRequest, CreateDirectorResponse,
    CreateVarnishServerRequest, CreateVarnishServerResponse, CreateVclTemplateRequest,
    CreateVclTemplateResponse, DeleteBackendRequest, DeleteBackendResponse, DeleteClusterRequest,
    DeleteClusterResponse, DeleteDcRequest, DeleteDcResponse, DeleteDirectorRequest,
    DeleteDirectorResponse, DeleteVarnishServerRequest, DeleteVarnishServerResponse,
    DeleteVclTemplateRequest, DeleteVclTemplateResponse, GetBackendRequest, GetBackendResponse,
    GetClusterRequest, GetClusterResponse, GetDcRequest, GetDcResponse, GetDirectorRequest,
    GetDirectorResponse, GetVarnishServerRequest, GetVarnishServerResponse, GetVclTemplateRequest,
    GetVclTemplateResponse, ListBackendsRequest, ListBackendsResponse, ListClustersRequest,
    ListClustersResponse, ListDcsRequest, ListDcsResponse, ListDirectorsRequest,
    ListDirectorsResponse, ListVarnishServersRequest, ListVarnishServersResponse,
    ListVclTemplatesRequest, ListVclTemplatesResponse, UpdateBackendRequest, UpdateBackendResponse,
    UpdateClusterRequest, UpdateClusterResponse, UpdateDcRequest, UpdateDcResponse,
    UpdateDirectorRequest, UpdateDirectorResponse, UpdateVarnishServerRequest,
    UpdateVarnishServerResponse, UpdateVclTemplateRequest, UpdateVclTemplateResponse,
};
use vaas_proto::v1::{Task, TaskState};
use vaas_store::{Store, WriteOutcome};

use crate::error::ApiError;
use crate::follow::TaskFollower;
use crate::validate::{self, Intent};

/// Time kept back from the caller's deadline to send the answer.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// The ConfigService implementation.
#[derive(Clone, Debug)]
pub struct ConfigApi {
    store: Store,
    follower: TaskFollower,
    relay_wake: Arc<Notify>,
    sync_timeout: Duration,
}

impl ConfigApi {
    /// Creates the service; `relay_wake` is notified after every committed write.
    pub fn new(
        store: Store,
        follower: TaskFollower,
        relay_wake: Arc<Notify>,
        sync_timeout: Duration,
    ) -> ConfigApi {
        ConfigApi {
            store,
            follower,
            relay_wake,
            sync_timeout,
        }
    }

    /// Finishes a committed write: at once for `prefer: respond-async` (with the tasks'
    /// location), otherwise after every task finished, failed, or the deadline came.
    async fn settle<T>(
        &self,
        metadata: &MetadataMap,
        resource: String,
        outcome: WriteOutcome<T>,
    ) -> Result<(T, Vec<Task>, MetadataMap), ApiError> {
        self.relay_wake.notify_one();
        let WriteOutcome { value, tasks } = outcome;
        let task_ids: Vec<i64> = tasks.iter().map(|task| task.id).collect();
        info!(%resource, ?task_ids, "change saved");
        let mut headers = MetadataMap::new();
        if tasks.is_empty() {
            return Ok((value, tasks, headers));
        }
        if prefers_async(metadata) {
            headers.insert(
                "preference-applied",
                MetadataValue::from_static("respond-async"),
            );
            let location = tasks
                .iter()
                .map(|task| task.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(location) = location.parse() {
                headers.insert("location", location);
            }
            return Ok((value, tasks, headers));
        }
        let wait = caller_timeout(metadata)
            .map(|timeout| timeout.saturating_sub(DEADLINE_MARGIN))
            .map_or(self.sync_timeout, |timeout| timeout.min(self.sync_timeout));
        let tasks = self
            .follower
            .wait_until_finished(&task_ids, Instant::now() + wait)
            .await?;
        if tasks
            .iter()
            .any(|task| task.state == TaskState::Failure as i32)
        {
            return Err(ApiError::ReloadFailed { resource, tasks });
        }
        if !tasks.iter().all(crate::follow::is_terminal) {
            return Err(ApiError::ReloadPending { resource, tasks });
        }
        Ok((value, tasks, headers))
    }
}

/// Returns true when the request carries `prefer: respond-async` (RFC 7240).
pub fn prefers_async(metadata: &MetadataMap) -> bool {
    metadata.get_all("prefer").iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split([',', ';'])
                .any(|preference| preference.trim().eq_ignore_ascii_case("respond-async"))
        })
    })
}

/// Parses the caller's `grpc-timeout` header ("100m", "5S", "1M" …).
pub fn caller_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn respond<T>(body: T, headers: MetadataMap) -> Response<T> {
    let mut response = Response::new(body);
    *response.metadata_mut() = headers;
    response
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    #[instrument(skip_all, fields(rpc = "CreateDc"))]
    async fn create_dc(
        &self,
        request: Request<CreateDcRequest>,
    ) -> Result<Response<CreateDcResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let dc = validate::dc(validate::required(request.dc, "dc")?, Intent::Create)?;
        let outcome = self.store.create_dc(&dc).await.map_err(ApiError::from)?;
        let resource = format!("dcs/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            CreateDcResponse {
                dc: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetDc"))]
    async fn get_dc(
        &self,
        request: Request<GetDcRequest>,
    ) -> Result<Response<GetDcResponse>, Status> {
        let dc = self
            .store
            .get_dc(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetDcResponse { dc: Some(dc) }))
    }

    #[instrument(skip_all, fields(rpc = "ListDcs"))]
    async fn list_dcs(
        &self,
        request: Request<ListDcsRequest>,
    ) -> Result<Response<ListDcsResponse>, Status> {
        let request = request.into_inner();
        let (dcs, next_page_token) = self
            .store
            .list_dcs(request.page_size, &request.page_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListDcsResponse {
            dcs,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateDc"))]
    async fn update_dc(
        &self,
        request: Request<UpdateDcRequest>,
    ) -> Result<Response<UpdateDcResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let dc = validate::dc(validate::required(request.dc, "dc")?, Intent::Update)?;
        let outcome = self.store.update_dc(&dc).await.map_err(ApiError::from)?;
        let resource = format!("dcs/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            UpdateDcResponse {
                dc: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "DeleteDc"))]
    async fn delete_dc(
        &self,
        request: Request<DeleteDcRequest>,
    ) -> Result<Response<DeleteDcResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let outcome = self
            .store
            .delete_dc(request.id)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("dcs/{}", request.id);
        let ((), tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(DeleteDcResponse { tasks }, headers))
    }
    #[instrument(skip_all, fields(rpc = "CreateCluster"))]
    async fn create_cluster(
        &self,
        request: Request<CreateClusterRequest>,
    ) -> Result<Response<CreateClusterResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let cluster = validate::cluster(
            validate::required(request.cluster, "cluster")?,
            Intent::Create,
        )?;
        let outcome = self
            .store
            .create_cluster(&cluster)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("clusters/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            CreateClusterResponse {
                cluster: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetCluster"))]
    async fn get_cluster(
        &self,
        request: Request<GetClusterRequest>,
    ) -> Result<Response<GetClusterResponse>, Status> {
        let cluster = self
            .store
            .get_cluster(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetClusterResponse {
            cluster: Some(cluster),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListClusters"))]
    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        let request = request.into_inner();
        let (clusters, next_page_token) = self
            .store
            .list_clusters(request.page_size, &request.page_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListClustersResponse {
            clusters,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateCluster"))]
    async fn update_cluster(
        &self,
        request: Request<UpdateClusterRequest>,
    ) -> Result<Response<UpdateClusterResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let cluster = validate::cluster(
            validate::required(request.cluster, "cluster")?,
            Intent::Update,
        )?;
        let outcome = self
            .store
            .update_cluster(&cluster)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("clusters/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            UpdateClusterResponse {
                cluster: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "DeleteCluster"))]
    async fn delete_cluster(
        &self,
        request: Request<DeleteClusterRequest>,
    ) -> Result<Response<DeleteClusterResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let outcome = self
            .store
            .delete_cluster(request.id)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("clusters/{}", request.id);
        let ((), tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(DeleteClusterResponse { tasks }, headers))
    }
    #[instrument(skip_all, fields(rpc = "CreateVclTemplate"))]
    async fn create_vcl_template(
        &self,
        request: Request<CreateVclTemplateRequest>,
    ) -> Result<Response<CreateVclTemplateResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let vcl_template = validate::vcl_template(
            validate::required(request.vcl_template, "vcl_template")?,
            Intent::Create,
        )?;
        let outcome = self
            .store
            .create_vcl_template(&vcl_template)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("vcl_templates/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            CreateVclTemplateResponse {
                vcl_template: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetVclTemplate"))]
    async fn get_vcl_template(
        &self,
        request: Request<GetVclTemplateRequest>,
    ) -> Result<Response<GetVclTemplateResponse>, Status> {
        let vcl_template = self
            .store
            .get_vcl_template(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetVclTemplateResponse {
            vcl_template: Some(vcl_template),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListVclTemplates"))]
    async fn list_vcl_templates(
        &self,
        request: Request<ListVclTemplatesRequest>,
    ) -> Result<Response<ListVclTemplatesResponse>, Status> {
        let request = request.into_inner();
        let (vcl_templates, next_page_token) = self
            .store
            .list_vcl_templates(request.page_size, &request.page_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListVclTemplatesResponse {
            vcl_templates,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateVclTemplate"))]
    async fn update_vcl_template(
        &self,
        request: Request<UpdateVclTemplateRequest>,
    ) -> Result<Response<UpdateVclTemplateResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let vcl_template = validate::vcl_template(
            validate::required(request.vcl_template, "vcl_template")?,
            Intent::Update,
        )?;
        let outcome = self
            .store
            .update_vcl_template(&vcl_template)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("vcl_templates/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            UpdateVclTemplateResponse {
                vcl_template: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "DeleteVclTemplate"))]
    async fn delete_vcl_template(
        &self,
        request: Request<DeleteVclTemplateRequest>,
    ) -> Result<Response<DeleteVclTemplateResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let outcome = self
            .store
            .delete_vcl_template(request.id)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("vcl_templates/{}", request.id);
        let ((), tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(DeleteVclTemplateResponse { tasks }, headers))
    }
    #[instrument(skip_all, fields(rpc = "CreateVarnishServer"))]
    async fn create_varnish_server(
        &self,
        request: Request<CreateVarnishServerRequest>,
    ) -> Result<Response<CreateVarnishServerResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let varnish_server = validate::varnish_server(
            validate::required(request.varnish_server, "varnish_server")?,
            Intent::Create,
        )?;
        let outcome = self
            .store
            .create_varnish_server(&varnish_server)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("varnish_servers/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            CreateVarnishServerResponse {
                varnish_server: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetVarnishServer"))]
    async fn get_varnish_server(
        &self,
        request: Request<GetVarnishServerRequest>,
    ) -> Result<Response<GetVarnishServerResponse>, Status> {
        let varnish_server = self
            .store
            .get_varnish_server(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetVarnishServerResponse {
            varnish_server: Some(varnish_server),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListVarnishServers"))]
    async fn list_varnish_servers(
        &self,
        request: Request<ListVarnishServersRequest>,
    ) -> Result<Response<ListVarnishServersResponse>, Status> {
        let request = request.into_inner();
        let (varnish_servers, next_page_token) = self
            .store
            .list_varnish_servers(request.page_size, &request.page_token, request.cluster_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListVarnishServersResponse {
            varnish_servers,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateVarnishServer"))]
    async fn update_varnish_server(
        &self,
        request: Request<UpdateVarnishServerRequest>,
    ) -> Result<Response<UpdateVarnishServerResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let varnish_server = validate::varnish_server(
            validate::required(request.varnish_server, "varnish_server")?,
            Intent::Update,
        )?;
        let outcome = self
            .store
            .update_varnish_server(&varnish_server)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("varnish_servers/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            UpdateVarnishServerResponse {
                varnish_server: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "DeleteVarnishServer"))]
    async fn delete_varnish_server(
        &self,
        request: Request<DeleteVarnishServerRequest>,
    ) -> Result<Response<DeleteVarnishServerResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let outcome = self
            .store
            .delete_varnish_server(request.id)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("varnish_servers/{}", request.id);
        let ((), tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(DeleteVarnishServerResponse { tasks }, headers))
    }
    #[instrument(skip_all, fields(rpc = "CreateDirector"))]
    async fn create_director(
        &self,
        request: Request<CreateDirectorRequest>,
    ) -> Result<Response<CreateDirectorResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let director = validate::director(
            validate::required(request.director, "director")?,
            Intent::Create,
        )?;
        let outcome = self
            .store
            .create_director(&director)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("directors/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            CreateDirectorResponse {
                director: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetDirector"))]
    async fn get_director(
        &self,
        request: Request<GetDirectorRequest>,
    ) -> Result<Response<GetDirectorResponse>, Status> {
        let director = self
            .store
            .get_director(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetDirectorResponse {
            director: Some(director),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListDirectors"))]
    async fn list_directors(
        &self,
        request: Request<ListDirectorsRequest>,
    ) -> Result<Response<ListDirectorsResponse>, Status> {
        let request = request.into_inner();
        let (directors, next_page_token) = self
            .store
            .list_directors(request.page_size, &request.page_token, request.cluster_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListDirectorsResponse {
            directors,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateDirector"))]
    async fn update_director(
        &self,
        request: Request<UpdateDirectorRequest>,
    ) -> Result<Response<UpdateDirectorResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let director = validate::director(
            validate::required(request.director, "director")?,
            Intent::Update,
        )?;
        let outcome = self
            .store
            .update_director(&director)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("directors/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            UpdateDirectorResponse {
                director: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "DeleteDirector"))]
    async fn delete_director(
        &self,
        request: Request<DeleteDirectorRequest>,
    ) -> Result<Response<DeleteDirectorResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let outcome = self
            .store
            .delete_director(request.id)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("directors/{}", request.id);
        let ((), tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(DeleteDirectorResponse { tasks }, headers))
    }
    #[instrument(skip_all, fields(rpc = "CreateBackend"))]
    async fn create_backend(
        &self,
        request: Request<CreateBackendRequest>,
    ) -> Result<Response<CreateBackendResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let backend = validate::backend(
            validate::required(request.backend, "backend")?,
            Intent::Create,
        )?;
        let outcome = self
            .store
            .create_backend(&backend)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("backends/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            CreateBackendResponse {
                backend: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetBackend"))]
    async fn get_backend(
        &self,
        request: Request<GetBackendRequest>,
    ) -> Result<Response<GetBackendResponse>, Status> {
        let backend = self
            .store
            .get_backend(request.into_inner().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetBackendResponse {
            backend: Some(backend),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListBackends"))]
    async fn list_backends(
        &self,
        request: Request<ListBackendsRequest>,
    ) -> Result<Response<ListBackendsResponse>, Status> {
        let request = request.into_inner();
        let (backends, next_page_token) = self
            .store
            .list_backends(request.page_size, &request.page_token, request.director_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListBackendsResponse {
            backends,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "UpdateBackend"))]
    async fn update_backend(
        &self,
        request: Request<UpdateBackendRequest>,
    ) -> Result<Response<UpdateBackendResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let backend = validate::backend(
            validate::required(request.backend, "backend")?,
            Intent::Update,
        )?;
        let outcome = self
            .store
            .update_backend(&backend)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("backends/{}", outcome.value.id);
        let (value, tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(
            UpdateBackendResponse {
                backend: Some(value),
                tasks,
            },
            headers,
        ))
    }

    #[instrument(skip_all, fields(rpc = "DeleteBackend"))]
    async fn delete_backend(
        &self,
        request: Request<DeleteBackendRequest>,
    ) -> Result<Response<DeleteBackendResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let outcome = self
            .store
            .delete_backend(request.id)
            .await
            .map_err(ApiError::from)?;
        let resource = format!("backends/{}", request.id);
        let ((), tasks, headers) = self.settle(&metadata, resource, outcome).await?;
        Ok(respond(DeleteBackendResponse { tasks }, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respond_async_is_found_among_other_preferences() {
        let mut metadata = MetadataMap::new();
        assert!(!prefers_async(&metadata));
        metadata.insert(
            "prefer",
            MetadataValue::from_static("wait=10, Respond-Async"),
        );
        assert!(prefers_async(&metadata));
    }

    #[test]
    fn grpc_timeout_units_are_understood() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", MetadataValue::from_static("1500m"));
        assert_eq!(caller_timeout(&metadata), Some(Duration::from_millis(1500)));
        metadata.insert("grpc-timeout", MetadataValue::from_static("2M"));
        assert_eq!(caller_timeout(&metadata), Some(Duration::from_secs(120)));
        metadata.insert("grpc-timeout", MetadataValue::from_static("x"));
        assert_eq!(caller_timeout(&metadata), None);
    }
}
