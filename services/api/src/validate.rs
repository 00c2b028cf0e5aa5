//! Validation and normalisation of request messages: every field is checked, every violation is
//! reported with its field path, and optional fields get their documented defaults. Nothing that
//! reaches the store (and from there the VCL) is unchecked.

use std::net::IpAddr;

use prost_types::Duration;
use tonic_types::FieldViolation;
use vaas_proto::v1::{
    Backend, Cluster, Dc, Director, DirectorMode, DirectorRouter, ServerStatus, VarnishServer,
    VclSyntax, VclTemplate,
};

use crate::error::ApiError;

/// Whether a message is being created (id ignored) or updated (id required).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// A create: the id is ignored and set to 0.
    Create,
    /// An update: the id must be positive.
    Update,
}

/// Largest accepted VCL template, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;

/// Collects the violations of one message.
struct Violations {
    prefix: &'static str,
    list: Vec<FieldViolation>,
}

impl Violations {
    fn new(prefix: &'static str) -> Violations {
        Violations {
            prefix,
            list: Vec::new(),
        }
    }

    fn add(&mut self, field: &str, description: impl Into<String>) {
        self.list.push(FieldViolation::new(
            format!("{}.{field}", self.prefix),
            description,
        ));
    }

    fn check(&mut self, ok: bool, field: &str, description: &str) {
        if !ok {
            self.add(field, description);
        }
    }

    fn id(&mut self, intent: Intent, id: &mut i64) {
        match intent {
            Intent::Create => *id = 0,
            Intent::Update => self.check(*id > 0, "id", "must be a positive id"),
        }
    }

    fn reference(&mut self, field: &str, id: i64) {
        self.check(
            id > 0,
            field,
            "must be the positive id of an existing resource",
        );
    }

    fn text(&mut self, field: &str, value: &str, required: bool, max_chars: usize) {
        if required && value.trim().is_empty() {
            self.add(field, "must not be empty");
        } else if value.chars().count() > max_chars {
            self.add(field, format!("must be at most {max_chars} characters"));
        } else if value.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
    }

    fn name(&mut self, field: &str, value: &str, extra: &[char], max_chars: usize) {
        let allowed = |c: char| c.is_ascii_alphanumeric() || extra.contains(&c);
        if value.is_empty() || value.len() > max_chars || !value.chars().all(allowed) {
            let extra: String = extra.iter().map(|c| format!(" \"{c}\"")).collect();
            self.add(
                field,
                format!("must be 1 to {max_chars} ASCII letters, digits or{extra}"),
            );
        }
    }

    fn address(&mut self, field: &str, value: &str) {
        if value.parse::<IpAddr>().is_err() {
            self.add(
                field,
                "must be an IPv4 or IPv6 address, for example 10.0.0.1 or ::1",
            );
        }
    }

    fn port(&mut self, field: &str, value: &mut Option<u32>, default: u32) {
        let port = *value.get_or_insert(default);
        self.check(
            (1..=65535).contains(&port),
            field,
            "must be a port from 1 to 65535",
        );
    }

    fn enumeration(&mut self, field: &str, valid: bool) {
        self.check(valid, field, "is not a known value");
    }

    fn duration(
        &mut self,
        field: &str,
        value: &mut Option<Duration>,
        default_millis: i64,
        max_secs: i64,
    ) {
        let duration = value.get_or_insert(Duration {
            seconds: default_millis / 1000,
            nanos: ((default_millis % 1000) * 1_000_000) as i32,
        });
        let positive = duration.seconds > 0 || (duration.seconds == 0 && duration.nanos > 0);
        let in_range = duration.nanos >= 0 && positive && duration.seconds < max_secs;
        self.check(
            in_range,
            field,
            &format!("must be more than 0 and less than {max_secs} seconds"),
        );
    }

    fn finish<T>(self, value: T) -> Result<T, ApiError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(ApiError::InvalidArgument(self.list))
        }
    }
}

/// Returns the message or an INVALID_ARGUMENT naming the missing field.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::invalid(field, "is required"))
}

/// Validates a datacenter.
pub fn dc(mut dc: Dc, intent: Intent) -> Result<Dc, ApiError> {
    let mut violations = Violations::new("dc");
    violations.id(intent, &mut dc.id);
    violations.text("name", &dc.name, true, 128);
    violations.name("symbol", &dc.symbol, &['_', '-'], 64);
    violations.finish(dc)
}

/// Validates a cluster; output-only fields are cleared.
pub fn cluster(mut cluster: Cluster, intent: Intent) -> Result<Cluster, ApiError> {
    let mut violations = Violations::new("cluster");
    violations.id(intent, &mut cluster.id);
    violations.name("name", &cluster.name, &['_'], 64);
    for (index, label) in cluster.labels.iter().enumerate() {
        let well_formed = label
            .split_once(':')
            .is_some_and(|(key, value)| !key.is_empty() && !value.is_empty());
        violations.check(
            well_formed,
            &format!("labels[{index}]"),
            "must be key:value",
        );
        violations.text(&format!("labels[{index}]"), label, true, 128);
    }
    cluster.reload_timestamp = None;
    cluster.error_timestamp = None;
    cluster.last_error.clear();
    violations.finish(cluster)
}

/// Validates a VCL template.
pub fn vcl_template(mut template: VclTemplate, intent: Intent) -> Result<VclTemplate, ApiError> {
    let mut violations = Violations::new("vcl_template");
    violations.id(intent, &mut template.id);
    violations.name("name", &template.name, &['_', '-'], 64);
    if template.content.trim().is_empty() {
        violations.add(
            "content",
            "must not be empty; \"<VCL/>\" renders the default VCL",
        );
    } else if template.content.len() > MAX_TEMPLATE_BYTES {
        violations.add(
            "content",
            format!("must be at most {MAX_TEMPLATE_BYTES} bytes"),
        );
    } else if template.content.contains('\0') {
        violations.add("content", "must not contain NUL characters");
    }
    violations.enumeration("syntax", VclSyntax::try_from(template.syntax).is_ok());
    if template.syntax == VclSyntax::Unspecified as i32 {
        template.syntax = VclSyntax::VclSyntax41 as i32;
    }
    violations.text("comment", &template.comment, false, 1000);
    violations.finish(template)
}

/// Validates a Varnish server; output-only fields are cleared.
pub fn varnish_server(
    mut server: VarnishServer,
    intent: Intent,
) -> Result<VarnishServer, ApiError> {
    let mut violations = Violations::new("varnish_server");
    violations.id(intent, &mut server.id);
    violations.address("address", &server.address);
    violations.text("hostname", &server.hostname, false, 253);
    violations.port("http_port", &mut server.http_port, 80);
    violations.port("admin_port", &mut server.admin_port, 6082);
    violations.enumeration("status", ServerStatus::try_from(server.status).is_ok());
    if server.status == ServerStatus::Unspecified as i32 {
        server.status = ServerStatus::Disabled as i32;
    }
    violations.reference("dc_id", server.dc_id);
    violations.reference("template_id", server.template_id);
    violations.reference("cluster_id", server.cluster_id);
    server.running_vcl_version.clear();
    server.agent_seen_time = None;
    violations.finish(server)
}

/// Validates a director. Its name becomes part of VCL identifiers and its route expression a
/// VCL long string, so both are held to what VCL can carry safely.
pub fn director(mut director: Director, intent: Intent) -> Result<Director, ApiError> {
    let mut violations = Violations::new("director");
    violations.id(intent, &mut director.id);
    let name_ok = director
        .name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && director.name.len() <= 50
        && director
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    violations.check(
        name_ok,
        "name",
        "must be a letter followed by at most 49 ASCII letters, digits or \"_\"",
    );
    violations.text("service", &director.service, false, 128);
    for (index, &cluster_id) in director.cluster_ids.iter().enumerate() {
        violations.reference(&format!("cluster_ids[{index}]"), cluster_id);
    }
    violations.enumeration("mode", DirectorMode::try_from(director.mode).is_ok());
    if director.mode == DirectorMode::Unspecified as i32 {
        director.mode = DirectorMode::RoundRobin as i32;
    }
    violations.enumeration("router", DirectorRouter::try_from(director.router).is_ok());
    if director.router == DirectorRouter::Unspecified as i32 {
        director.router = DirectorRouter::Path as i32;
    }
    violations.text("route_expression", &director.route_expression, true, 512);
    if director.route_expression.contains("\"}") {
        violations.add("route_expression", "must not contain the sequence \"}");
    } else if let Err(error) = pcre2::bytes::Regex::new(&director.route_expression) {
        // The same engine as varnishd's (PCRE2): an expression it accepts here compiles there.
        violations.add(
            "route_expression",
            format!("is not a valid regular expression: {error}"),
        );
    }
    director.active_active.get_or_insert(true);
    director.enabled.get_or_insert(true);
    violations.finish(director)
}

/// Validates a backend.
pub fn backend(mut backend: Backend, intent: Intent) -> Result<Backend, ApiError> {
    let mut violations = Violations::new("backend");
    violations.id(intent, &mut backend.id);
    violations.reference("director_id", backend.director_id);
    violations.reference("dc_id", backend.dc_id);
    violations.address("address", &backend.address);
    violations.port("port", &mut backend.port, 80);
    let weight = *backend.weight.get_or_insert(1);
    violations.check(weight <= 100, "weight", "must be from 0 to 100");
    let max_connections = *backend.max_connections.get_or_insert(5);
    violations.check(
        (1..=100_000).contains(&max_connections),
        "max_connections",
        "must be from 1 to 100000",
    );
    violations.duration("connect_timeout", &mut backend.connect_timeout, 300, 300);
    violations.duration(
        "first_byte_timeout",
        &mut backend.first_byte_timeout,
        5000,
        3600,
    );
    violations.duration(
        "between_bytes_timeout",
        &mut backend.between_bytes_timeout,
        1000,
        3600,
    );
    backend.enabled.get_or_insert(true);
    for (index, tag) in backend.tags.iter().enumerate() {
        violations.name(&format!("tags[{index}]"), tag, &['_', '-', ':', '.'], 64);
    }
    violations.finish(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations(error: ApiError) -> Vec<String> {
        match error {
            ApiError::InvalidArgument(list) => list.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other}"),
        }
    }

    #[test]
    fn backend_reports_every_bad_field_and_fills_defaults() {
        let bad = Backend {
            address: "10.0.0.300".into(),
            weight: Some(101),
            tags: vec!["ok".into(), "no spaces".into()],
            ..Default::default()
        };
        assert_eq!(
            violations(backend(bad, Intent::Create).unwrap_err()),
            [
                "backend.director_id",
                "backend.dc_id",
                "backend.address",
                "backend.weight",
                "backend.tags[1]"
            ]
        );
        let good = backend(
            Backend {
                director_id: 1,
                dc_id: 1,
                address: "2001:db8::1".into(),
                weight: Some(0),
                ..Default::default()
            },
            Intent::Create,
        )
        .unwrap();
        assert_eq!(good.port, Some(80));
        assert_eq!(
            good.weight,
            Some(0),
            "weight 0 is kept, not replaced by the default"
        );
        assert_eq!(
            good.connect_timeout,
            Some(Duration {
                seconds: 0,
                nanos: 300_000_000
            })
        );
        assert_eq!(good.enabled, Some(true));
    }

    #[test]
    fn director_names_and_expressions_cannot_break_out_of_vcl() {
        let mut sneaky = Director {
            name: "api; }".into(),
            route_expression: "^/x\"} + req.http.evil + {\"".into(),
            ..Default::default()
        };
        assert_eq!(
            violations(director(sneaky.clone(), Intent::Create).unwrap_err()),
            ["director.name", "director.route_expression"]
        );
        sneaky.name = "api".into();
        sneaky.route_expression = "^/api/\n".into();
        assert_eq!(
            violations(director(sneaky.clone(), Intent::Create).unwrap_err()),
            ["director.route_expression"]
        );
        sneaky.route_expression = "^/(api".into();
        let error = director(sneaky.clone(), Intent::Create)
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a valid regular expression"), "{error}");
        // PCRE features that Rust's regex crate lacks are fine: varnishd uses PCRE2 too.
        sneaky.route_expression = "^/(?!internal/)".into();
        assert!(director(sneaky, Intent::Create).is_ok());
    }

    #[test]
    fn updates_need_an_id_and_creates_ignore_it() {
        let dc_in = Dc {
            id: 42,
            name: "Frankfurt".into(),
            symbol: "fra-1".into(),
        };
        assert_eq!(dc(dc_in.clone(), Intent::Create).unwrap().id, 0);
        assert_eq!(dc(dc_in, Intent::Update).unwrap().id, 42);
        let missing = Dc {
            id: 0,
            name: "x".into(),
            symbol: "x".into(),
        };
        assert_eq!(
            violations(dc(missing, Intent::Update).unwrap_err()),
            ["dc.id"]
        );
    }

    #[test]
    fn server_status_defaults_to_disabled() {
        let server = varnish_server(
            VarnishServer {
                address: "127.0.0.1".into(),
                dc_id: 1,
                template_id: 1,
                cluster_id: 1,
                running_vcl_version: "forged".into(),
                ..Default::default()
            },
            Intent::Create,
        )
        .unwrap();
        assert_eq!(server.status, ServerStatus::Disabled as i32);
        assert_eq!(
            (server.http_port, server.admin_port),
            (Some(80), Some(6082))
        );
        assert!(
            server.running_vcl_version.is_empty(),
            "output-only fields are not writable"
        );
    }
}
