//! StatusService.Explain: which route, director and backends a server's VCL picks for a request.
//!
//! The decision is [`vaas_vcl::explain`]'s, computed from the same snapshot the scheduler hands
//! the agents, so it is what the VCL rendered from the current configuration does; this module
//! only checks the request, reads the server and its cluster's snapshot, and writes the answer.
//! It never asks a Varnish server: whether the server runs that VCL is its reported version.

use std::collections::HashMap;

use tonic_types::FieldViolation;
use vaas_proto::v1::{
    Backend, ExplainRequest, ExplainResponse, ExplainedBackendGroup, ServerStatus, VarnishServer,
};
use vaas_store::Store;
use vaas_vcl::routing::{self, CANARY_RANGE, MAX_HEADER_NAME};

use crate::error::ApiError;
use crate::validate::MAX_URL_BYTES;

/// Most headers of an Explain request.
pub const MAX_HEADERS: usize = 32;

/// Longest header value of an Explain request, in characters.
pub const MAX_HEADER_VALUE_CHARS: usize = 1024;

/// Explains what the VCL that the current configuration renders for the request's server does
/// with the request, and whether the server runs that VCL.
pub async fn explain(store: &Store, request: ExplainRequest) -> Result<ExplainResponse, ApiError> {
    let routed = routed_request(&request)?;
    let server_id = request.server_id;
    let server = store.get::<VarnishServer>(server_id).await?;
    if server.status == ServerStatus::Disabled as i32 {
        return Err(ApiError::ServerDisabled { server_id });
    }
    let snapshot = store.cluster_snapshot(server.cluster_id).await?;
    // Rendering a large configuration is CPU work: off the async threads.
    let (snapshot, explained) = tokio::task::spawn_blocking(move || {
        let explained = vaas_vcl::explain(&snapshot, server_id, &routed);
        (snapshot, explained)
    })
    .await
    .map_err(ApiError::RenderPanicked)?;
    let explanation = explained?;
    // The server as the snapshot holds it, so that the version it runs and the version rendered
    // come from one read.
    let running_vcl_version = snapshot
        .servers
        .iter()
        .find(|server| server.id == server_id)
        .map_or(&server.running_vcl_version, |server| {
            &server.running_vcl_version
        });
    let backends: HashMap<i64, &Backend> = snapshot
        .backends
        .iter()
        .map(|backend| (backend.id, backend))
        .collect();
    let backend_groups = explanation
        .backend_groups
        .iter()
        .map(|group| ExplainedBackendGroup {
            dc_id: group.dc_id,
            backends: group
                .backend_ids
                .iter()
                .filter_map(|id| backends.get(id).map(|backend| (*backend).clone()))
                .collect(),
        })
        .collect();
    let decision = explanation.decision;
    let (synthetic_status, synthetic_reason) = explanation
        .synthetic
        .map(|(status, reason)| (u32::from(status), reason))
        .unwrap_or_default();
    Ok(ExplainResponse {
        running: *running_vcl_version == explanation.version,
        vcl_version: explanation.version,
        route_id: decision.route_id.unwrap_or_default(),
        action: decision.action.map_or(0, |action| action as i32),
        director_id: decision.director_id.unwrap_or_default(),
        director: decision.director.unwrap_or_default(),
        backend_groups,
        synthetic_status,
        synthetic_reason,
        redirected: decision.redirect.is_some(),
        redirect_id: decision
            .redirect
            .as_ref()
            .and_then(|redirect| redirect.redirect_id)
            .unwrap_or_default(),
        location: decision
            .redirect
            .map(|redirect| redirect.location)
            .unwrap_or_default(),
    })
}

/// Checks every field of an Explain request and returns the request as the router sees it;
/// every violation names its field.
pub fn routed_request(request: &ExplainRequest) -> Result<routing::Request, ApiError> {
    let mut violations = Vec::new();
    let mut violation = |field: String, description: String| {
        violations.push(FieldViolation::new(field, description));
    };
    if request.server_id <= 0 {
        violation("server_id".into(), "must be a positive id".into());
    }
    let routed = if request.url.len() > MAX_URL_BYTES {
        violation(
            "url".into(),
            format!("must be at most {MAX_URL_BYTES} bytes"),
        );
        None
    } else {
        routing::Request::from_absolute_url(&request.url)
            .map_err(|reason| violation("url".into(), reason))
            .ok()
    };
    if request.headers.len() > MAX_HEADERS {
        violation(
            "headers".into(),
            format!("must hold at most {MAX_HEADERS} headers"),
        );
    } else {
        for (index, header) in request.headers.iter().enumerate() {
            if let Err(reason) = check_header_name(&header.name) {
                violation(format!("headers[{index}].name"), reason);
            }
            if let Err(reason) = check_header_value(&header.value) {
                violation(format!("headers[{index}].value"), reason);
            }
        }
    }
    let canary_random = request.canary_random.unwrap_or(0);
    if canary_random >= CANARY_RANGE {
        violation(
            "canary_random".into(),
            format!("must be from 0 to {}", CANARY_RANGE - 1),
        );
    }
    // `routed` is `None` only when the url was refused, which left a violation.
    let Some(mut routed) = routed.filter(|_| violations.is_empty()) else {
        return Err(ApiError::InvalidArgument(violations));
    };
    // After what the url implies (an https url's X-Forwarded-Proto), which the router reads first.
    routed.headers.extend(
        request
            .headers
            .iter()
            .map(|header| (header.name.clone(), header.value.clone())),
    );
    routed.canary_random = canary_random;
    Ok(routed)
}

fn check_header_name(name: &str) -> Result<(), String> {
    let well_formed = (1..=MAX_HEADER_NAME).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !well_formed {
        return Err(format!(
            "must be 1 to {MAX_HEADER_NAME} ASCII letters, digits or \"-\""
        ));
    }
    // Two Host headers would contradict each other; the router only ever reads the URL's.
    if name.eq_ignore_ascii_case("host") {
        return Err("must not be Host: the url gives the Host header".into());
    }
    Ok(())
}

fn check_header_value(value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_HEADER_VALUE_CHARS {
        return Err(format!(
            "must be at most {MAX_HEADER_VALUE_CHARS} characters"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vaas_proto::v1::ExplainHeader;

    use super::*;

    fn header(name: &str, value: &str) -> ExplainHeader {
        ExplainHeader {
            name: name.into(),
            value: value.into(),
        }
    }

    fn violated_fields(request: &ExplainRequest) -> Vec<String> {
        match routed_request(request) {
            Err(ApiError::InvalidArgument(list)) => list.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_becomes_what_the_router_sees() {
        let routed = routed_request(&ExplainRequest {
            server_id: 3,
            url: "https://shop.example:8443/cart?id=1#top".into(),
            headers: vec![header("X-Team", "blue")],
            canary_random: Some(99),
        })
        .expect("valid");
        assert_eq!(
            routed,
            routing::Request {
                url: "/cart?id=1".into(),
                host: "shop.example:8443".into(),
                headers: vec![
                    ("X-Forwarded-Proto".into(), "https".into()),
                    ("X-Team".into(), "blue".into()),
                ],
                canary_random: 99,
            }
        );
        let defaulted = routed_request(&ExplainRequest {
            server_id: 3,
            url: "http://shop.example".into(),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!((defaulted.url.as_str(), defaulted.canary_random), ("/", 0));
    }

    #[test]
    fn every_bad_field_is_reported_by_its_path() {
        let bad = ExplainRequest {
            server_id: 0,
            url: "/relative".into(),
            headers: vec![
                header("X Team", "blue"),
                header("X-Ok", "tab\there"),
                header("host", "other.example"),
                header("", ""),
                header(&"x".repeat(65), &"v".repeat(1025)),
            ],
            canary_random: Some(100),
        };
        assert_eq!(
            violated_fields(&bad),
            [
                "server_id",
                "url",
                "headers[0].name",
                "headers[1].value",
                "headers[2].name",
                "headers[3].name",
                "headers[4].name",
                "headers[4].value",
                "canary_random",
            ]
        );
        let too_long = ExplainRequest {
            server_id: 1,
            url: format!("http://a.example/{}", "x".repeat(MAX_URL_BYTES)),
            headers: vec![header("X-A", "b"); MAX_HEADERS + 1],
            canary_random: None,
        };
        assert_eq!(violated_fields(&too_long), ["url", "headers"]);
    }
}
