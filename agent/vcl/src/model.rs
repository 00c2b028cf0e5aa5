//! Turns a snapshot into a plan: what one server's VCL holds, validated and in a fixed order.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use prost_types::Duration;
use vaas_proto::v1::{
    Backend, ClusterSnapshot, DirectorMode, DirectorRouter, ServerStatus, VclSyntax,
};

use crate::RenderError;
use crate::names;

/// Default backend port.
const DEFAULT_PORT: u32 = 80;
/// Default backend weight.
const DEFAULT_WEIGHT: u32 = 1;
/// Default maximum number of connections per backend.
const DEFAULT_MAX_CONNECTIONS: u32 = 5;
/// Default connect timeout, 0.3 s.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration {
    seconds: 0,
    nanos: 300_000_000,
};
/// Default first byte timeout, 5 s.
const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration {
    seconds: 5,
    nanos: 0,
};
/// Default between bytes timeout, 1 s.
const DEFAULT_BETWEEN_BYTES_TIMEOUT: Duration = Duration {
    seconds: 1,
    nanos: 0,
};
/// The backend tag that marks canary backends.
const CANARY_TAG: &str = "canary";

/// Everything the emitters need, validated.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The template to expand.
    pub(crate) template_id: i64,
    /// The VCL syntax line, "4.0" or "4.1".
    pub(crate) syntax: &'static str,
    /// Whether `/vaas_status` answers 200 (active) or 503.
    pub(crate) active: bool,
    /// Backends in emission order (director id, dc id, backend id).
    pub(crate) backends: Vec<BackendDef>,
    /// Directors in routing order: by host first, then by path; by id within each.
    pub(crate) directors: Vec<DirectorPlan>,
}

/// One `backend` declaration.
#[derive(Debug)]
pub(crate) struct BackendDef {
    pub(crate) vcl_name: String,
    pub(crate) host: String,
    pub(crate) port: u32,
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: String,
    pub(crate) first_byte_timeout: String,
    pub(crate) between_bytes_timeout: String,
}

/// One VaaS director as this server sees it.
#[derive(Debug)]
pub(crate) struct DirectorPlan {
    pub(crate) name: String,
    pub(crate) router: DirectorRouter,
    pub(crate) route_expression: String,
    pub(crate) mode: DirectorMode,
    /// The server's own datacenter first (when it has backends), then the others by dc id.
    pub(crate) groups: Vec<DcGroup>,
}

/// The backends of one director in one datacenter: one directors-vmod object.
#[derive(Debug)]
pub(crate) struct DcGroup {
    pub(crate) object_name: String,
    /// (backend VCL name, weight).
    pub(crate) members: Vec<(String, u32)>,
}

impl Plan {
    /// Builds the plan of server `server_id`.
    pub(crate) fn build(snapshot: &ClusterSnapshot, server_id: i64) -> Result<Plan, RenderError> {
        let server = snapshot
            .servers
            .iter()
            .find(|server| server.id == server_id)
            .ok_or(RenderError::ServerNotFound { server_id })?;
        let mut dc_symbols = BTreeMap::new();
        for dc in &snapshot.dcs {
            dc_symbols.insert(dc.id, names::dc_symbol(dc.id, &dc.symbol)?);
        }
        if !dc_symbols.contains_key(&server.dc_id) {
            return Err(RenderError::DcNotFound {
                dc_id: server.dc_id,
            });
        }
        let syntax = match VclSyntax::try_from(server_template_syntax(snapshot, server.template_id))
        {
            Ok(VclSyntax::VclSyntax40) => "4.0",
            _ => "4.1",
        };

        let mut directors: Vec<_> = snapshot
            .directors
            .iter()
            .filter(|director| director.enabled.unwrap_or(true))
            .collect();
        // Routing order: host routers before path routers, then by id.
        directors.sort_by_key(|director| {
            let by_path = director.router() != DirectorRouter::Domain;
            (by_path, director.id)
        });

        let mut seen_names = HashSet::new();
        seen_names.insert(crate::emit::PLACEHOLDER_BACKEND.to_owned());
        let mut claim = |name: &str| {
            if seen_names.insert(name.to_owned()) {
                Ok(())
            } else {
                Err(RenderError::NameCollision {
                    name: name.to_owned(),
                })
            }
        };

        let mut backends_out = Vec::new();
        let mut directors_out = Vec::new();
        for director in directors {
            names::check_director_name(director.id, &director.name)?;
            check_route_expression(&director.name, &director.route_expression)?;
            let mut backends: Vec<&Backend> = snapshot
                .backends
                .iter()
                .filter(|backend| backend.director_id == director.id)
                .filter(|backend| backend.enabled.unwrap_or(true))
                .collect();
            backends.sort_by_key(|backend| (backend.dc_id, backend.id));
            let has_canary = backends.iter().any(|backend| is_canary(backend));
            let canary_only = server.is_canary && has_canary;
            if canary_only {
                backends.retain(|backend| is_canary(backend));
            }
            let active_active = director.active_active.unwrap_or(true);

            let mut by_dc: BTreeMap<i64, Vec<(String, u32)>> = BTreeMap::new();
            for backend in backends {
                let symbol = dc_symbols
                    .get(&backend.dc_id)
                    .ok_or(RenderError::DcNotFound {
                        dc_id: backend.dc_id,
                    })?;
                if backend.dc_id != server.dc_id && !active_active {
                    continue;
                }
                let def = backend_def(backend, &director.name, symbol)?;
                claim(&def.vcl_name)?;
                let mut weight = backend.weight.unwrap_or(DEFAULT_WEIGHT);
                if canary_only && weight == 0 {
                    weight = 1;
                }
                by_dc
                    .entry(backend.dc_id)
                    .or_default()
                    .push((def.vcl_name.clone(), weight));
                backends_out.push(def);
            }

            let mut groups = Vec::new();
            let own = by_dc.remove(&server.dc_id);
            for (dc_id, members) in own.map(|m| (server.dc_id, m)).into_iter().chain(by_dc) {
                let object_name = format!("{}_{}", director.name, dc_symbols[&dc_id]);
                claim(&object_name)?;
                groups.push(DcGroup {
                    object_name,
                    members,
                });
            }
            directors_out.push(DirectorPlan {
                name: director.name.clone(),
                router: director.router(),
                route_expression: director.route_expression.clone(),
                mode: director.mode(),
                groups,
            });
        }

        Ok(Plan {
            template_id: server.template_id,
            syntax,
            active: server.status() == ServerStatus::Active,
            backends: backends_out,
            directors: directors_out,
        })
    }
}

/// Returns the raw syntax value of a template, 0 (unspecified) when it is missing: the missing
/// template itself is reported by the caller.
fn server_template_syntax(snapshot: &ClusterSnapshot, template_id: i64) -> i32 {
    snapshot
        .templates
        .iter()
        .find(|template| template.id == template_id)
        .map_or(0, |template| template.syntax)
}

/// Tells whether a backend carries the canary tag.
fn is_canary(backend: &Backend) -> bool {
    backend.tags.iter().any(|tag| tag == CANARY_TAG)
}

/// Checks that a route expression can be written inside a VCL long string `{"..."}`.
pub(crate) fn check_route_expression(director: &str, expression: &str) -> Result<(), RenderError> {
    let reason = if expression.contains("\"}") {
        Some("contains \"}\"".to_owned())
    } else {
        expression
            .chars()
            .find(|c| c.is_control())
            .map(|c| format!("contains the control character {:?}", c))
    };
    match reason {
        Some(reason) => Err(RenderError::InvalidRouteExpression {
            director: director.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Validates a backend and computes its declaration.
fn backend_def(
    backend: &Backend,
    director_name: &str,
    dc_symbol: &str,
) -> Result<BackendDef, RenderError> {
    let address: IpAddr = backend
        .address
        .parse()
        .map_err(|_| RenderError::InvalidAddress {
            backend_id: backend.id,
            address: backend.address.clone(),
        })?;
    let port = backend.port.unwrap_or(DEFAULT_PORT);
    if !(1..=65535).contains(&port) {
        return Err(RenderError::InvalidPort {
            backend_id: backend.id,
            port,
        });
    }
    let host = address.to_string();
    let timeout = |value: &Option<Duration>, default: Duration, field: &'static str| {
        vcl_duration(value.unwrap_or(default)).ok_or(RenderError::InvalidTimeout {
            backend_id: backend.id,
            field,
        })
    };
    Ok(BackendDef {
        vcl_name: names::backend_name(director_name, backend.id, dc_symbol, &host, port),
        connect_timeout: timeout(
            &backend.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            "connect_timeout",
        )?,
        first_byte_timeout: timeout(
            &backend.first_byte_timeout,
            DEFAULT_FIRST_BYTE_TIMEOUT,
            "first_byte_timeout",
        )?,
        between_bytes_timeout: timeout(
            &backend.between_bytes_timeout,
            DEFAULT_BETWEEN_BYTES_TIMEOUT,
            "between_bytes_timeout",
        )?,
        host,
        port,
        max_connections: backend.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
    })
}

/// Formats a duration as a VCL duration literal in seconds ("0.3s", "5s"); `None` when negative
/// or not normalised.
pub(crate) fn vcl_duration(duration: Duration) -> Option<String> {
    if duration.seconds < 0 || !(0..1_000_000_000).contains(&duration.nanos) {
        return None;
    }
    if duration.nanos == 0 {
        return Some(format!("{}s", duration.seconds));
    }
    let fraction = format!("{:09}", duration.nanos);
    Some(format!(
        "{}.{}s",
        duration.seconds,
        fraction.trim_end_matches('0')
    ))
}
