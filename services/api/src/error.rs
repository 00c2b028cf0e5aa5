//! The API's error type and the one place where errors become gRPC statuses.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};
use vaas_proto::v1::Task;

/// The `ErrorInfo.domain` of every VaaS error.
pub const ERROR_DOMAIN: &str = "vaas.v1";

/// What can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; nothing was saved.
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] vaas_store::Error),
    /// The change was saved but the reload of at least one cluster failed.
    #[error("{resource} was saved, but the reload failed: {}", describe_failures(.tasks))]
    ReloadFailed {
        /// The saved resource, for example "backends/7".
        resource: String,
        /// The tasks of the write as they ended.
        tasks: Vec<Task>,
    },
    /// The change was saved but a reload was still running when the answer was due.
    #[error("{resource} was saved, but the reload is still running: watch {}", task_names(.tasks))]
    ReloadPending {
        /// The saved resource.
        resource: String,
        /// The tasks of the write as they were at the deadline.
        tasks: Vec<Task>,
    },
    /// The change was saved, but its reloads could not be followed (the store or NATS failed
    /// while the write waited): the caller must not take it for a rejected write.
    #[error("{resource} was saved, but its reload could not be followed ({reason}): watch {}", task_names(.tasks))]
    ReloadUnknown {
        /// The saved resource.
        resource: String,
        /// The tasks of the write, as created.
        tasks: Vec<Task>,
        /// What failed while following them, already logged.
        reason: String,
    },
    /// The update mask of a partial update names no writable field, or the merge failed.
    #[error(transparent)]
    UpdateMask(#[from] crate::field_mask::MaskError),
    /// A diff took longer than its limit.
    #[error("the diff between revisions {from} and {to} is too expensive to compute")]
    DiffTooLarge {
        /// The older revision.
        from: i64,
        /// The newer revision.
        to: i64,
    },
    /// The server is disabled: no VCL is rendered for it (StatusService.Explain).
    #[error("server {server_id} is disabled and runs no VCL")]
    ServerDisabled {
        /// The server.
        server_id: i64,
    },
    /// The configuration renders no VCL for the server (StatusService.Explain).
    #[error(transparent)]
    Render(#[from] vaas_vcl::RenderError),
    /// Rendering panicked or was cancelled.
    #[error("rendering the VCL failed unexpectedly")]
    RenderPanicked(#[source] tokio::task::JoinError),
    /// NATS failed while following a task.
    #[error("cannot follow task events")]
    Bus(#[from] vaas_bus::Error),
    /// Subscribing to NATS failed.
    #[error("cannot subscribe to task events")]
    Subscribe(#[from] async_nats::SubscribeError),
}

impl ApiError {
    /// Returns an invalid-argument error for one field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> ApiError {
        ApiError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

fn describe_violations(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|violation| format!("{}: {}", violation.field, violation.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The longest description of failed tasks in a status message: the message travels in HTTP/2
/// trailers, which peers cap at a few KiB.
const FAILURES_MAX_CHARS: usize = 4000;

fn describe_failures(tasks: &[Task]) -> String {
    let described = describe_every_failure(tasks);
    if described.chars().count() <= FAILURES_MAX_CHARS {
        return described;
    }
    let mut cut: String = described.chars().take(FAILURES_MAX_CHARS).collect();
    cut.push_str(" … (cut; GetTask has each task's error)");
    cut
}

fn describe_every_failure(tasks: &[Task]) -> String {
    tasks
        .iter()
        .filter(|task| !task.error.is_empty())
        .map(|task| {
            format!(
                "{} (cluster {}): {}",
                task.name, task.cluster_name, task.error
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn task_names(tasks: &[Task]) -> String {
    tasks
        .iter()
        .map(|task| task.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn reload_info(reason: &str, resource: &str, tasks: &[Task]) -> ErrorDetails {
    let task_ids = tasks
        .iter()
        .map(|task| task.id.to_string())
        .collect::<Vec<_>>()
        .join(",");
    ErrorDetails::with_error_info(
        reason,
        ERROR_DOMAIN,
        HashMap::from([
            ("resource".to_owned(), resource.to_owned()),
            ("task_ids".to_owned(), task_ids),
            ("saved".to_owned(), "true".to_owned()),
        ]),
    )
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        use vaas_store::Error as StoreError;
        let message = error.to_string();
        match error {
            ApiError::InvalidArgument(violations) => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request(violations),
            ),
            ApiError::Store(StoreError::NotFound { resource, id }) => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_resource_info(resource, id.to_string(), "", ""),
            ),
            ApiError::Store(StoreError::RevisionNotFound { template_id, .. }) => {
                Status::with_error_details(
                    Code::NotFound,
                    message,
                    ErrorDetails::with_resource_info(
                        "vcl template revision",
                        template_id.to_string(),
                        "",
                        "",
                    ),
                )
            }
            ApiError::Store(StoreError::MissingReference {
                field,
                resource,
                id,
            }) => {
                let mut details = ErrorDetails::with_bad_request_violation(field, message.clone());
                details.set_resource_info(resource, id.to_string(), "", "does not exist");
                Status::with_error_details(Code::NotFound, message, details)
            }
            ApiError::Store(StoreError::AlreadyExists { field, .. }) => Status::with_error_details(
                Code::AlreadyExists,
                message.clone(),
                ErrorDetails::with_bad_request_violation(field, message),
            ),
            ApiError::Store(StoreError::InUse { .. }) => Status::failed_precondition(message),
            ApiError::Store(StoreError::Invalid { field, .. }) => Status::with_error_details(
                Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request_violation(field, message),
            ),
            ApiError::Store(StoreError::InvalidPageToken) => Status::with_error_details(
                Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request_violation("page_token", message),
            ),
            ApiError::Store(StoreError::InvalidResourceName { .. }) => Status::with_error_details(
                Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request_violation("resource", message),
            ),
            ApiError::Store(StoreError::Database(ref source)) => {
                tracing::error!(error = %source, "store failed");
                Status::unavailable("the store is unavailable, nothing was saved; try again")
            }
            ApiError::Store(StoreError::Commit(ref source)) => {
                tracing::error!(error = %source, "store commit failed");
                Status::unavailable("the store is unavailable, nothing was saved; try again")
            }
            ApiError::Store(StoreError::WriteLost) => Status::unavailable(message),
            ApiError::Store(
                StoreError::UnsupportedUrl
                | StoreError::Migrate(_)
                | StoreError::Random(_)
                | StoreError::Fenced { .. },
            ) => Status::internal(message),
            ApiError::ReloadFailed { resource, tasks } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                reload_info("RELOAD_FAILED", &resource, &tasks),
            ),
            ApiError::ReloadPending { resource, tasks } => Status::with_error_details(
                Code::DeadlineExceeded,
                message,
                reload_info("RELOAD_PENDING", &resource, &tasks),
            ),
            ApiError::ReloadUnknown {
                resource, tasks, ..
            } => Status::with_error_details(
                Code::Unavailable,
                message,
                reload_info("RELOAD_UNKNOWN", &resource, &tasks),
            ),
            ApiError::UpdateMask(ref mask_error) if mask_error.path().is_some() => {
                Status::with_error_details(
                    Code::InvalidArgument,
                    message.clone(),
                    ErrorDetails::with_bad_request_violation("update_mask", message),
                )
            }
            ApiError::UpdateMask(ref source) => {
                tracing::error!(error = %source, "partial update failed");
                Status::internal("the partial update could not be merged; nothing was saved")
            }
            ApiError::DiffTooLarge { .. } => Status::resource_exhausted(message),
            ApiError::ServerDisabled { .. } | ApiError::Render(_) => {
                Status::failed_precondition(message)
            }
            ApiError::RenderPanicked(ref source) => {
                tracing::error!(error = %source, "rendering panicked");
                Status::internal(message)
            }
            ApiError::Bus(ref source) => {
                tracing::error!(error = %source, "nats failed");
                Status::unavailable(message)
            }
            ApiError::Subscribe(ref source) => {
                tracing::error!(error = %source, "nats subscribe failed");
                Status::unavailable(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_reload_status_stays_small_enough_for_http2_trailers() {
        let tasks: Vec<Task> = (1..=5)
            .map(|id| Task {
                id,
                name: format!("tasks/{id}"),
                error: "e".repeat(2000),
                ..Default::default()
            })
            .collect();
        let status = Status::from(ApiError::ReloadFailed {
            resource: "backends/1".into(),
            tasks,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().len() < 4200, "{}", status.message().len());
        assert!(status.message().ends_with("GetTask has each task's error)"));
    }

    #[test]
    fn a_disabled_server_or_an_unrenderable_configuration_is_a_failed_precondition() {
        let disabled = Status::from(ApiError::ServerDisabled { server_id: 4 });
        assert_eq!(disabled.code(), Code::FailedPrecondition);
        assert_eq!(disabled.message(), "server 4 is disabled and runs no VCL");
        let render = Status::from(ApiError::from(vaas_vcl::RenderError::DcNotFound {
            dc_id: 2,
        }));
        assert_eq!(render.code(), Code::FailedPrecondition);
        assert_eq!(render.message(), "dc 2 is not in the snapshot");
    }

    #[test]
    fn a_write_whose_reload_cannot_be_followed_says_it_was_saved() {
        let status = Status::from(ApiError::ReloadUnknown {
            resource: "backends/1".into(),
            tasks: vec![Task {
                id: 9,
                name: "tasks/9".into(),
                ..Default::default()
            }],
            reason: "the store is unavailable".into(),
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("backends/1 was saved"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("tasks/9"), "{}", status.message());
        let details = status.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "RELOAD_UNKNOWN");
        assert_eq!(info.metadata.get("saved").map(String::as_str), Some("true"));
        assert_eq!(info.metadata.get("task_ids").map(String::as_str), Some("9"));
    }
}
