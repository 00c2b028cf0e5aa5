//! Turns a snapshot into a plan: what one server's VCL holds, validated and in a fixed order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use prost_types::Duration;
use vaas_proto::v1::{
    Backend, ClusterSnapshot, Director, DirectorHashingPolicy, DirectorMode, DirectorRouter, Probe,
    ServerStatus, TimeProfile, VclSyntax,
};

use crate::RenderError;
use crate::names;
use crate::routing::{self, RoutingTable};

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
/// Default status a healthy backend answers a probe with.
const DEFAULT_EXPECTED_RESPONSE: u32 = 200;
/// Default time between two probes, 3 s.
const DEFAULT_PROBE_INTERVAL: Duration = Duration {
    seconds: 3,
    nanos: 0,
};
/// Default time a probe may take, 1 s.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration {
    seconds: 1,
    nanos: 0,
};
/// Default number of probes considered.
const DEFAULT_PROBE_WINDOW: u32 = 5;
/// Default number of good probes (in the window) that make a backend healthy.
const DEFAULT_PROBE_THRESHOLD: u32 = 3;
/// Varnish keeps the results of at most 64 probes (a bit field): larger windows do not compile.
const MAX_PROBE_WINDOW: u32 = 64;
/// Longest probe URL, as the API accepts.
const MAX_PROBE_URL: usize = 256;
/// Prefix of probe VCL names, so a probe never shares a name with a backend or a director.
const PROBE_PREFIX: &str = "probe_";

/// Everything the emitters need, validated.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The template to expand.
    pub(crate) template_id: i64,
    /// The VCL syntax line, "4.0" or "4.1".
    pub(crate) syntax: &'static str,
    /// Whether `/vaas_status` answers 200 (active) or 503.
    pub(crate) active: bool,
    /// The probes used by at least one backend, by probe id.
    pub(crate) probes: Vec<ProbeDef>,
    /// Backends in emission order (director id, dc id, backend id).
    pub(crate) backends: Vec<BackendDef>,
    /// Directors in routing order: by host first, then by path; by id within each.
    pub(crate) directors: Vec<DirectorPlan>,
    /// The routes, tried before the directors' route expressions.
    pub(crate) routing: RoutingTable,
    /// Set in the top VCL of a split render: `/vaas_version` goes to the VCL of this label.
    pub(crate) version_label: Option<String>,
}

/// One `probe` declaration, validated.
#[derive(Debug, Clone)]
pub(crate) struct ProbeDef {
    pub(crate) vcl_name: String,
    pub(crate) url: String,
    pub(crate) expected_response: u32,
    pub(crate) interval: String,
    pub(crate) timeout: String,
    pub(crate) window: u32,
    pub(crate) threshold: u32,
    pub(crate) initial: u32,
}

/// One `backend` declaration.
#[derive(Debug, Clone)]
pub(crate) struct BackendDef {
    pub(crate) vcl_name: String,
    pub(crate) host: String,
    pub(crate) port: u32,
    pub(crate) limits: Limits,
    /// The VCL name of the probe that checks this backend.
    pub(crate) probe: Option<String>,
}

/// A backend's connection limit and timeouts (VCL duration literals), from the backend itself or
/// from its director's time profile.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: String,
    pub(crate) first_byte_timeout: String,
    pub(crate) between_bytes_timeout: String,
}

/// One VaaS director as this server sees it.
#[derive(Debug, Clone)]
pub(crate) struct DirectorPlan {
    pub(crate) name: String,
    pub(crate) router: DirectorRouter,
    pub(crate) route_expression: String,
    pub(crate) mode: DirectorMode,
    /// What a hash director hashes.
    pub(crate) hashing_policy: DirectorHashingPolicy,
    /// Whether the router replaces the matched part of the URL by "/".
    pub(crate) remove_path: bool,
    /// False for virtual directors: declared, never chosen by the router.
    pub(crate) routed: bool,
    /// Plain-HTTP requests are redirected to HTTPS before a backend is chosen.
    pub(crate) https_only: bool,
    /// The server's own datacenter first (when it has backends), then the others by dc id.
    pub(crate) groups: Vec<DcGroup>,
    /// Set in the top VCL of a split render ([`crate::render_split`]): once the HTTPS redirect
    /// is past, the request goes to the VCL labelled so, which holds this director's backends.
    pub(crate) label: Option<String>,
}

/// The backends of one director in one datacenter: one directors-vmod object.
#[derive(Debug, Clone)]
pub(crate) struct DcGroup {
    pub(crate) object_name: String,
    /// The datacenter.
    pub(crate) dc_id: i64,
    /// (backend VCL name, weight).
    pub(crate) members: Vec<(String, u32)>,
    /// The backends' ids, in the order of `members`.
    pub(crate) backend_ids: Vec<i64>,
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

        let directors = routing::director_order(snapshot);
        let routing = RoutingTable::build(snapshot)?;

        // VCL symbols are case-insensitive: "Api_fra" and "api_fra" are one name to varnishd.
        let mut seen_names = HashSet::new();
        seen_names.insert(crate::emit::PLACEHOLDER_BACKEND.to_ascii_lowercase());
        let mut claim = |name: &str| {
            if seen_names.insert(name.to_ascii_lowercase()) {
                Ok(())
            } else {
                Err(RenderError::NameCollision {
                    name: name.to_owned(),
                })
            }
        };

        // Only probes that an emitted backend refers to are declared: varnishd refuses a VCL
        // with an unused probe.
        let mut probes_out: BTreeMap<i64, ProbeDef> = BTreeMap::new();
        let mut backends_out = Vec::new();
        let mut directors_out = Vec::new();
        // Grouped once: a cluster of 5,000 backends in 500 directors would otherwise be scanned
        // once per director.
        let mut backends_by_director: HashMap<i64, Vec<&Backend>> = HashMap::new();
        for backend in snapshot
            .backends
            .iter()
            .filter(|backend| backend.enabled.unwrap_or(true))
        {
            backends_by_director
                .entry(backend.director_id)
                .or_default()
                .push(backend);
        }
        for director in directors {
            names::check_director_name(director.id, &director.name)?;
            check_route_expression(&director.name, &director.route_expression)?;
            let probe = director_probe(snapshot, director)?;
            let profile_limits = director_time_profile(snapshot, director)?
                .map(time_profile_limits)
                .transpose()?;
            let mut backends = backends_by_director
                .remove(&director.id)
                .unwrap_or_default();
            backends.sort_by_key(|backend| (backend.dc_id, backend.id));
            // Only the datacenters this server may use count: its own, and the others when the
            // director is active_active. Canary backends elsewhere do not make a canary server
            // drop the regular backends it can reach.
            let active_active = director.active_active.unwrap_or(true);
            backends.retain(|backend| active_active || backend.dc_id == server.dc_id);
            let has_canary = backends.iter().any(|backend| is_canary(backend));
            let canary_only = server.is_canary && has_canary;
            if canary_only {
                backends.retain(|backend| is_canary(backend));
            }

            let mut by_dc: BTreeMap<i64, Vec<(String, u32, i64)>> = BTreeMap::new();
            for backend in backends {
                let symbol = dc_symbols
                    .get(&backend.dc_id)
                    .ok_or(RenderError::DcNotFound {
                        dc_id: backend.dc_id,
                    })?;
                if let Some(probe) = &probe
                    && !probes_out.contains_key(&director.probe_id)
                {
                    claim(&probe.vcl_name)?;
                    probes_out.insert(director.probe_id, probe.clone());
                }
                let limits = match &profile_limits {
                    Some(limits) if backend.inherit_time_profile => limits.clone(),
                    _ => backend_limits(backend)?,
                };
                let probe_name = probe.as_ref().map(|probe| probe.vcl_name.clone());
                let def = backend_def(backend, &director.name, symbol, limits, probe_name)?;
                claim(&def.vcl_name)?;
                let mut weight = backend.weight.unwrap_or(DEFAULT_WEIGHT);
                if canary_only && weight == 0 {
                    weight = 1;
                }
                by_dc.entry(backend.dc_id).or_default().push((
                    def.vcl_name.clone(),
                    weight,
                    backend.id,
                ));
                backends_out.push(def);
            }

            let mut groups = Vec::new();
            let own = by_dc.remove(&server.dc_id);
            for (dc_id, members) in own.map(|m| (server.dc_id, m)).into_iter().chain(by_dc) {
                let object_name = format!("{}_{}", director.name, dc_symbols[&dc_id]);
                claim(&object_name)?;
                groups.push(DcGroup {
                    object_name,
                    dc_id,
                    backend_ids: members.iter().map(|member| member.2).collect(),
                    members: members
                        .into_iter()
                        .map(|(name, weight, _)| (name, weight))
                        .collect(),
                });
            }
            directors_out.push(DirectorPlan {
                name: director.name.clone(),
                router: director.router(),
                route_expression: director.route_expression.clone(),
                mode: director.mode(),
                hashing_policy: director.hashing_policy(),
                remove_path: director.remove_path,
                routed: !director.r#virtual,
                https_only: routing::is_https_only(director),
                groups,
                label: None,
            });
        }

        Ok(Plan {
            template_id: server.template_id,
            syntax,
            active: server.status() == ServerStatus::Active,
            probes: probes_out.into_values().collect(),
            backends: backends_out,
            directors: directors_out,
            routing,
            version_label: None,
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
    limits: Limits,
    probe: Option<String>,
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
    Ok(BackendDef {
        vcl_name: names::backend_name(director_name, backend.id, dc_symbol, &host, port),
        host,
        port,
        limits,
        probe,
    })
}

/// Computes a backend's own limits, with the defaults for unset fields.
fn backend_limits(backend: &Backend) -> Result<Limits, RenderError> {
    limits(
        backend.max_connections,
        [
            &backend.connect_timeout,
            &backend.first_byte_timeout,
            &backend.between_bytes_timeout,
        ],
        |field| RenderError::InvalidTimeout {
            backend_id: backend.id,
            field,
        },
    )
}

/// Computes the limits a time profile gives the backends that inherit it, with the defaults for
/// unset fields (the same defaults as a backend's).
fn time_profile_limits(profile: &TimeProfile) -> Result<Limits, RenderError> {
    limits(
        profile.max_connections,
        [
            &profile.connect_timeout,
            &profile.first_byte_timeout,
            &profile.between_bytes_timeout,
        ],
        |field| RenderError::InvalidTimeProfile {
            time_profile_id: profile.id,
            field,
        },
    )
}

/// Fills in the defaults and formats the timeouts (connect, first byte, between bytes);
/// `invalid` names the culprit of an invalid timeout.
fn limits(
    max_connections: Option<u32>,
    [connect, first_byte, between_bytes]: [&Option<Duration>; 3],
    invalid: impl Fn(&'static str) -> RenderError,
) -> Result<Limits, RenderError> {
    let timeout = |value: &Option<Duration>, default: Duration, field: &'static str| {
        vcl_duration(value.unwrap_or(default)).ok_or_else(|| invalid(field))
    };
    Ok(Limits {
        max_connections: max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        connect_timeout: timeout(connect, DEFAULT_CONNECT_TIMEOUT, "connect_timeout")?,
        first_byte_timeout: timeout(first_byte, DEFAULT_FIRST_BYTE_TIMEOUT, "first_byte_timeout")?,
        between_bytes_timeout: timeout(
            between_bytes,
            DEFAULT_BETWEEN_BYTES_TIMEOUT,
            "between_bytes_timeout",
        )?,
    })
}

/// Returns the validated probe of `director`, `None` when it has none.
fn director_probe(
    snapshot: &ClusterSnapshot,
    director: &Director,
) -> Result<Option<ProbeDef>, RenderError> {
    if director.probe_id == 0 {
        return Ok(None);
    }
    let probe = snapshot
        .probes
        .iter()
        .find(|probe| probe.id == director.probe_id)
        .ok_or_else(|| RenderError::ProbeNotFound {
            director: director.name.clone(),
            probe_id: director.probe_id,
        })?;
    probe_def(probe).map(Some)
}

/// Returns the time profile of `director`, `None` when it has none.
fn director_time_profile<'a>(
    snapshot: &'a ClusterSnapshot,
    director: &Director,
) -> Result<Option<&'a TimeProfile>, RenderError> {
    if director.time_profile_id == 0 {
        return Ok(None);
    }
    snapshot
        .time_profiles
        .iter()
        .find(|profile| profile.id == director.time_profile_id)
        .map(Some)
        .ok_or_else(|| RenderError::TimeProfileNotFound {
            director: director.name.clone(),
            time_profile_id: director.time_profile_id,
        })
}

/// Validates a probe and computes its declaration.
fn probe_def(probe: &Probe) -> Result<ProbeDef, RenderError> {
    if !names::is_identifier(&probe.name) {
        return Err(RenderError::InvalidProbeName {
            probe_id: probe.id,
            name: probe.name.clone(),
        });
    }
    check_probe_url(probe)?;
    let invalid = |field| RenderError::InvalidProbeSetting {
        probe_id: probe.id,
        field,
    };
    let expected_response = probe.expected_response.unwrap_or(DEFAULT_EXPECTED_RESPONSE);
    if !(100..=599).contains(&expected_response) {
        return Err(invalid("expected_response"));
    }
    // Zero is not a duration to Varnish here: it silently replaces it by its own default
    // (5 s interval, 2 s timeout), which is not what the user asked for.
    let positive = |value: Option<Duration>, default: Duration, field| {
        let value = value.unwrap_or(default);
        if value.seconds == 0 && value.nanos == 0 {
            return Err(invalid(field));
        }
        vcl_duration(value).ok_or_else(|| invalid(field))
    };
    let interval = positive(probe.interval, DEFAULT_PROBE_INTERVAL, "interval")?;
    let timeout = positive(probe.timeout, DEFAULT_PROBE_TIMEOUT, "timeout")?;
    let window = probe.window.unwrap_or(DEFAULT_PROBE_WINDOW);
    if !(1..=MAX_PROBE_WINDOW).contains(&window) {
        return Err(invalid("window"));
    }
    let threshold = probe.threshold.unwrap_or(DEFAULT_PROBE_THRESHOLD);
    if !(1..=window).contains(&threshold) {
        return Err(invalid("threshold"));
    }
    // Varnish's own default is threshold - 1: a backend starts sick and turns healthy on its
    // first good probe, which runs as soon as the VCL is loaded. Written out so the text says
    // what happens. Not 0: every VCL probes its backends afresh, so 0 would make every probed
    // backend sick for threshold × interval after every reload.
    let initial = if probe.start_as_healthy {
        threshold
    } else {
        threshold - 1
    };
    Ok(ProbeDef {
        vcl_name: format!("{PROBE_PREFIX}{}", probe.name.to_ascii_lowercase()),
        url: probe.url.clone(),
        expected_response,
        interval,
        timeout,
        window,
        threshold,
        initial,
    })
}

/// Checks that a probe URL is a path that can be written inside a VCL string `"..."` and sent in
/// a request line: starts with "/", printable ASCII without spaces or `"`, at most 256 characters.
fn check_probe_url(probe: &Probe) -> Result<(), RenderError> {
    let url = &probe.url;
    let valid = url.starts_with('/')
        && url.len() <= MAX_PROBE_URL
        && url.chars().all(|c| c.is_ascii_graphic() && c != '"');
    if valid {
        Ok(())
    } else {
        Err(RenderError::InvalidProbeUrl {
            probe_id: probe.id,
            url: url.clone(),
        })
    }
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
