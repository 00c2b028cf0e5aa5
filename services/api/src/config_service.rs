//! The ConfigService: validates writes, stores them with their reload tasks, and answers after
//! the reloads (by default) or at once (`prefer: respond-async`).
//!
//! Every resource gets the same five RPCs from one generic implementation ([`ConfigApi::create`],
//! [`ConfigApi::update`] …); the table at the end of this file stamps them out, one line per
//! resource, so spans, errors and partial updates live in one place. What differs between
//! synchronous and asynchronous writes lives in [`ConfigApi::settle`].

use std::sync::Arc;
use std::time::Duration;

use prost_types::FieldMask;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use vaas_proto::v1::config_service_server::ConfigService;
use vaas_proto::v1::*;
use vaas_store::{Resource, Store, WriteOutcome};

use crate::address_policy::AddressPolicy;
use crate::error::ApiError;
use crate::field_mask::{self, MessageFields};
use crate::follow::TaskFollower;
use crate::token_service::actor;
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
    address_policy: Arc<AddressPolicy>,
}

impl ConfigApi {
    /// Creates the service; `relay_wake` is notified after every committed write.
    pub fn new(
        store: Store,
        follower: TaskFollower,
        relay_wake: Arc<Notify>,
        sync_timeout: Duration,
        address_policy: AddressPolicy,
    ) -> ConfigApi {
        ConfigApi {
            store,
            follower,
            relay_wake,
            sync_timeout,
            address_policy: Arc::new(address_policy),
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
        let tasks = match self
            .follower
            .wait_until_finished(&task_ids, Instant::now() + wait)
            .await
        {
            Ok(tasks) => tasks,
            Err(error) => {
                // The change is committed: "nothing was saved" would be a lie.
                tracing::error!(%resource, %error, "cannot follow the reload of a saved change");
                return Err(ApiError::ReloadUnknown {
                    resource,
                    tasks,
                    reason: error.to_string(),
                });
            }
        };
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

/// What the API knows of a resource beyond the store: its proto message and its validation.
pub trait ApiResource: Resource + prost::Message + Default {
    /// Validates and normalises an item about to be created or updated.
    fn validate(self, intent: Intent) -> Result<Self, ApiError>;
    /// The message's fields, for partial updates; the output-only ones are read-only.
    fn fields() -> &'static MessageFields;

    /// Checks what depends on the operator's configuration rather than on the item alone (the
    /// networks backends may not point at).
    fn check_policy(&self, policy: &AddressPolicy) -> Result<(), ApiError> {
        let _ = policy;
        Ok(())
    }
}

/// Refuses a backend in a network the operator denies.
fn backend_address_policy(backend: &Backend, policy: &AddressPolicy) -> Result<(), ApiError> {
    match policy.denies(&backend.address) {
        Some(network) => Err(ApiError::invalid(
            "backend.address",
            format!("is in {network}, a network backends may not point at"),
        )),
        None => Ok(()),
    }
}

impl ConfigApi {
    /// Validates and creates an item, then settles the write.
    async fn create<R: ApiResource>(
        &self,
        actor: &str,
        metadata: &MetadataMap,
        item: Option<R>,
    ) -> Result<(R, Vec<Task>, MetadataMap), ApiError> {
        let item = validate::required(item, R::FIELD)?.validate(Intent::Create)?;
        item.check_policy(&self.address_policy)?;
        let outcome = self.store.acting_as(actor).create(&item).await?;
        let resource = format!("{}/{}", R::COLLECTION, outcome.value.id());
        self.settle(metadata, resource, outcome).await
    }

    /// Merges the fields named in `mask` into the stored item (all of them without a mask),
    /// validates the result and stores it, in one transaction; then settles the write.
    async fn update<R: ApiResource>(
        &self,
        actor: &str,
        metadata: &MetadataMap,
        patch: Option<R>,
        mask: Option<FieldMask>,
    ) -> Result<(R, Vec<Task>, MetadataMap), ApiError> {
        let patch = validate::required(patch, R::FIELD)?;
        let id = patch.id();
        if id <= 0 {
            return Err(ApiError::invalid(
                format!("{}.id", R::FIELD),
                "must be a positive id",
            ));
        }
        let paths = mask.map(|mask| mask.paths).unwrap_or_default();
        let policy = Arc::clone(&self.address_policy);
        let outcome = self
            .store
            .acting_as(actor)
            .update_with(id, move |current: &R| {
                let merged = field_mask::merge(current, &patch, &paths, R::fields())?;
                let item = merged.validate(Intent::Update)?;
                item.check_policy(&policy)?;
                Ok::<_, ApiError>(item)
            })
            .await?;
        let resource = format!("{}/{id}", R::COLLECTION);
        self.settle(metadata, resource, outcome).await
    }

    /// Deletes an item, then settles the write.
    async fn delete<R: ApiResource>(
        &self,
        actor: &str,
        metadata: &MetadataMap,
        id: i64,
    ) -> Result<((), Vec<Task>, MetadataMap), ApiError> {
        let outcome = self.store.acting_as(actor).delete::<R>(id).await?;
        let resource = format!("{}/{id}", R::COLLECTION);
        self.settle(metadata, resource, outcome).await
    }
}

/// Most backends one bulk call changes.
pub const MAX_BULK_ITEMS: usize = 10_000;

impl ConfigApi {
    /// Merges one masked change into every listed backend and stores them in one transaction.
    async fn update_backends(
        &self,
        actor: &str,
        metadata: &MetadataMap,
        request: UpdateBackendsRequest,
    ) -> Result<(Vec<Backend>, Vec<Task>, MetadataMap), ApiError> {
        let patch = validate::required(request.backend, "backend")?;
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        if paths.is_empty() || paths.iter().any(|path| path == "*") {
            return Err(ApiError::invalid(
                "update_mask",
                "must name the fields to change, for example \"enabled\" or \"weight\"",
            ));
        }
        if request.ids.is_empty() || request.ids.len() > MAX_BULK_ITEMS {
            return Err(ApiError::invalid(
                "ids",
                format!("must hold 1 to {MAX_BULK_ITEMS} backend ids"),
            ));
        }
        let policy = Arc::clone(&self.address_policy);
        let outcome = self
            .store
            .acting_as(actor)
            .update_many_with(&request.ids, move |current: &Backend| {
                let merged = field_mask::merge(current, &patch, &paths, Backend::fields())?;
                let backend = merged.validate(Intent::Update)?;
                backend.check_policy(&policy)?;
                Ok::<_, ApiError>(backend)
            })
            .await?;
        let resource = format!("backends ({} changed)", outcome.value.len());
        self.settle(metadata, resource, outcome).await
    }

    /// Validates every wanted backend, then makes them the director's whole set.
    async fn replace_director_backends(
        &self,
        actor: &str,
        metadata: &MetadataMap,
        request: ReplaceDirectorBackendsRequest,
    ) -> Result<(Vec<Backend>, Vec<Task>, MetadataMap), ApiError> {
        if request.director_id <= 0 {
            return Err(ApiError::invalid("director_id", "must be a positive id"));
        }
        if request.backends.len() > MAX_BULK_ITEMS {
            return Err(ApiError::invalid(
                "backends",
                format!("must hold at most {MAX_BULK_ITEMS} backends"),
            ));
        }
        let mut wanted = Vec::with_capacity(request.backends.len());
        let mut violations = Vec::new();
        for (index, backend) in request.backends.into_iter().enumerate() {
            let backend = Backend {
                director_id: request.director_id,
                ..backend
            };
            match backend
                .validate(Intent::Create)
                .and_then(|backend| backend.check_policy(&self.address_policy).map(|()| backend))
            {
                Ok(backend) => wanted.push(backend),
                Err(ApiError::InvalidArgument(list)) => {
                    violations.extend(list.into_iter().map(|mut violation| {
                        violation.field =
                            violation
                                .field
                                .replacen("backend.", &format!("backends[{index}]."), 1);
                        violation
                    }));
                }
                Err(other) => return Err(other),
            }
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        // The director must exist even when the new set is empty.
        self.store.get::<Director>(request.director_id).await?;
        let scope = ListBackendsRequest {
            director_id: request.director_id,
            ..Default::default()
        };
        let description = format!("replace backends of director {}", request.director_id);
        let outcome = self
            .store
            .acting_as(actor)
            .replace_all(
                &scope,
                &wanted,
                |backend: &Backend| (backend.address.clone(), backend.port),
                description,
            )
            .await?;
        let resource = format!("directors/{}/backends", request.director_id);
        self.settle(metadata, resource, outcome).await
    }
}

/// Stamps out, for each resource of the table, its [`ApiResource`] implementation and its five
/// RPCs: `Create<R>`, `Get<R>`, `List<Rs>`, `Update<R>` and `Delete<R>`.
macro_rules! config_service {
    ($($resource:ident {
        field: $field:ident,
        plural: $plural:ident,
        validate: $validate:path,
        read_only: [$($read_only:literal),*]
        $(, policy: $policy:path)? $(,)?
    }),+ $(,)?) => {
        $(
            impl ApiResource for $resource {
                fn validate(self, intent: Intent) -> Result<Self, ApiError> {
                    $validate(self, intent)
                }

                fn fields() -> &'static MessageFields {
                    static FIELDS: std::sync::OnceLock<MessageFields> = std::sync::OnceLock::new();
                    FIELDS.get_or_init(|| {
                        let name = concat!("vaas.v1.", stringify!($resource));
                        MessageFields::from_descriptor_set(vaas_proto::FILE_DESCRIPTOR_SET, name)
                            .and_then(|fields| fields.with_read_only(&["id", $($read_only),*]))
                            .unwrap_or_else(|| panic!("{name} and its read-only fields are in the descriptor set"))
                    })
                }
                $(
                    fn check_policy(&self, policy: &AddressPolicy) -> Result<(), ApiError> {
                        $policy(self, policy)
                    }
                )?

            }
        )+

        pastey::paste! {
        #[tonic::async_trait]
        impl ConfigService for ConfigApi {
            $(
                #[instrument(skip_all, fields(rpc = concat!("Create", stringify!($resource))))]
                async fn [<create_ $field>](
                    &self,
                    request: Request<[<Create $resource Request>]>,
                ) -> Result<Response<[<Create $resource Response>]>, Status> {
                    let actor = actor(&request);
                    let (metadata, _, request) = request.into_parts();
                    let (value, tasks, headers) = self.create(&actor, &metadata, request.$field).await?;
                    Ok(respond([<Create $resource Response>] { $field: Some(value), tasks }, headers))
                }

                #[instrument(skip_all, fields(rpc = concat!("Get", stringify!($resource))))]
                async fn [<get_ $field>](
                    &self,
                    request: Request<[<Get $resource Request>]>,
                ) -> Result<Response<[<Get $resource Response>]>, Status> {
                    let item = self
                        .store
                        .get::<$resource>(request.into_inner().id)
                        .await
                        .map_err(ApiError::from)?;
                    Ok(Response::new([<Get $resource Response>] { $field: Some(item) }))
                }

                #[instrument(skip_all, fields(rpc = concat!("List", stringify!([<$plural:camel>]))))]
                async fn [<list_ $plural>](
                    &self,
                    request: Request<[<List $plural:camel Request>]>,
                ) -> Result<Response<[<List $plural:camel Response>]>, Status> {
                    let request = request.into_inner();
                    let ($plural, next_page_token) = self
                        .store
                        .list::<$resource>(&request, request.page_size, &request.page_token)
                        .await
                        .map_err(ApiError::from)?;
                    Ok(Response::new([<List $plural:camel Response>] { $plural, next_page_token }))
                }

                #[instrument(skip_all, fields(rpc = concat!("Update", stringify!($resource))))]
                async fn [<update_ $field>](
                    &self,
                    request: Request<[<Update $resource Request>]>,
                ) -> Result<Response<[<Update $resource Response>]>, Status> {
                    let actor = actor(&request);
                    let (metadata, _, request) = request.into_parts();
                    let (value, tasks, headers) = self
                        .update(&actor, &metadata, request.$field, request.update_mask)
                        .await?;
                    Ok(respond([<Update $resource Response>] { $field: Some(value), tasks }, headers))
                }

                #[instrument(skip_all, fields(rpc = concat!("Delete", stringify!($resource))))]
                async fn [<delete_ $field>](
                    &self,
                    request: Request<[<Delete $resource Request>]>,
                ) -> Result<Response<[<Delete $resource Response>]>, Status> {
                    let actor = actor(&request);
                    let (metadata, _, request) = request.into_parts();
                    let ((), tasks, headers) = self.delete::<$resource>(&actor, &metadata, request.id).await?;
                    Ok(respond([<Delete $resource Response>] { tasks }, headers))
                }
            )+

            #[instrument(skip_all, fields(rpc = "ListAuditEntries"))]
            async fn list_audit_entries(
                &self,
                request: Request<ListAuditEntriesRequest>,
            ) -> Result<Response<ListAuditEntriesResponse>, Status> {
                let request = request.into_inner();
                let (audit_entries, next_page_token) = self
                    .store
                    .list_audit_entries(&request.resource, request.page_size, &request.page_token)
                    .await
                    .map_err(ApiError::from)?;
                Ok(Response::new(ListAuditEntriesResponse { audit_entries, next_page_token }))
            }

            #[instrument(skip_all, fields(rpc = "UpdateBackends"))]
            async fn update_backends(
                &self,
                request: Request<UpdateBackendsRequest>,
            ) -> Result<Response<UpdateBackendsResponse>, Status> {
                let actor = actor(&request);
                let (metadata, _, request) = request.into_parts();
                let (backends, tasks, headers) = self.update_backends(&actor, &metadata, request).await?;
                Ok(respond(UpdateBackendsResponse { backends, tasks }, headers))
            }

            #[instrument(skip_all, fields(rpc = "ReplaceDirectorBackends"))]
            async fn replace_director_backends(
                &self,
                request: Request<ReplaceDirectorBackendsRequest>,
            ) -> Result<Response<ReplaceDirectorBackendsResponse>, Status> {
                let actor = actor(&request);
                let (metadata, _, request) = request.into_parts();
                let (backends, tasks, headers) = self
                    .replace_director_backends(&actor, &metadata, request)
                    .await?;
                Ok(respond(ReplaceDirectorBackendsResponse { backends, tasks }, headers))
            }

            #[instrument(skip_all, fields(rpc = "ListVclTemplateRevisions"))]
            async fn list_vcl_template_revisions(
                &self,
                request: Request<ListVclTemplateRevisionsRequest>,
            ) -> Result<Response<ListVclTemplateRevisionsResponse>, Status> {
                let request = request.into_inner();
                let (vcl_template_revisions, next_page_token) = self
                    .store
                    .list_template_revisions(request.template_id, request.page_size, &request.page_token)
                    .await
                    .map_err(ApiError::from)?;
                Ok(Response::new(ListVclTemplateRevisionsResponse { vcl_template_revisions, next_page_token }))
            }

            #[instrument(skip_all, fields(rpc = "GetVclTemplateRevision"))]
            async fn get_vcl_template_revision(
                &self,
                request: Request<GetVclTemplateRevisionRequest>,
            ) -> Result<Response<GetVclTemplateRevisionResponse>, Status> {
                let request = request.into_inner();
                let revision = self
                    .store
                    .get_template_revision(request.template_id, request.revision)
                    .await
                    .map_err(ApiError::from)?;
                Ok(Response::new(GetVclTemplateRevisionResponse { vcl_template_revision: Some(revision) }))
            }

            #[instrument(skip_all, fields(rpc = "DiffVclTemplateRevisions"))]
            async fn diff_vcl_template_revisions(
                &self,
                request: Request<DiffVclTemplateRevisionsRequest>,
            ) -> Result<Response<DiffVclTemplateRevisionsResponse>, Status> {
                let request = request.into_inner();
                let diff = crate::revisions::diff(&self.store, &request).await?;
                Ok(Response::new(DiffVclTemplateRevisionsResponse { diff }))
            }

            #[instrument(skip_all, fields(rpc = "RevertVclTemplate"))]
            async fn revert_vcl_template(
                &self,
                request: Request<RevertVclTemplateRequest>,
            ) -> Result<Response<RevertVclTemplateResponse>, Status> {
                let actor = actor(&request);
                let (metadata, _, request) = request.into_parts();
                let revision = self
                    .store
                    .get_template_revision(request.template_id, request.revision)
                    .await
                    .map_err(ApiError::from)?;
                let reverted = VclTemplate {
                    id: request.template_id,
                    content: revision.content,
                    comment: format!("revert to revision {}", revision.revision),
                    ..Default::default()
                };
                let mask = FieldMask { paths: vec!["content".into(), "comment".into()] };
                let (value, tasks, headers) = self
                    .update(&actor, &metadata, Some(reverted), Some(mask))
                    .await?;
                Ok(respond(RevertVclTemplateResponse { vcl_template: Some(value), tasks }, headers))
            }
        }
        }
    };
}

// The resources of the ConfigService: adding one is one line here, one store file and one proto
// file. Read-only fields are reported by the system and refused in an update mask.
config_service! {
    Dc { field: dc, plural: dcs, validate: validate::dc, read_only: [] },
    Cluster {
        field: cluster,
        plural: clusters,
        validate: validate::cluster,
        read_only: ["reload_timestamp", "error_timestamp", "last_error"],
    },
    VclTemplate { field: vcl_template, plural: vcl_templates, validate: validate::vcl_template, read_only: [] },
    VarnishServer {
        field: varnish_server,
        plural: varnish_servers,
        validate: validate::varnish_server,
        read_only: ["running_vcl_version", "agent_seen_time", "unsafe_settings", "cc_command"],
    },
    Director { field: director, plural: directors, validate: validate::director, read_only: [] },
    Backend {
        field: backend,
        plural: backends,
        validate: validate::backend,
        read_only: [],
        policy: backend_address_policy,
    },
    Probe { field: probe, plural: probes, validate: validate::probe, read_only: [] },
    TimeProfile {
        field: time_profile,
        plural: time_profiles,
        validate: validate::time_profile,
        read_only: [],
    },
    VclVariable {
        field: vcl_variable,
        plural: vcl_variables,
        validate: validate::vcl_variable,
        read_only: [],
    },
    VclTemplateBlock {
        field: vcl_template_block,
        plural: vcl_template_blocks,
        validate: validate::vcl_template_block,
        read_only: [],
    },    Route { field: route, plural: routes, validate: validate::route, read_only: [] },
    DomainMapping {
        field: domain_mapping,
        plural: domain_mappings,
        validate: validate::domain_mapping,
        read_only: [],
    },
    Redirect { field: redirect, plural: redirects, validate: validate::redirect, read_only: [] },
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
