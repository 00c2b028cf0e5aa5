//! Validation and normalisation of request messages: every field is checked, every violation is
//! reported with its field path, and optional fields get their documented defaults. Nothing that
//! reaches the store (and from there the VCL) is unchecked.

use std::net::IpAddr;

use prost_types::Duration;
use tonic_types::FieldViolation;
use vaas_proto::v1::{
    Backend, Cluster, Dc, Director, DirectorHashingPolicy, DirectorMode, DirectorProtocol,
    DirectorRouter, DomainMapping, DomainMappingType, Probe, Redirect, Route, RouteAction,
    ServerStatus, TimeProfile, VarnishServer, VclSyntax, VclTemplate, VclTemplateBlock,
    VclVariable,
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

/// Most items in a list of references (a director's clusters).
pub const MAX_LIST_ITEMS: usize = 1000;

/// Most labels of a cluster or tags of a backend.
pub const MAX_TAGS: usize = 32;

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

    /// Checks an IP address and rewrites it in its one canonical spelling (an IPv4-mapped IPv6
    /// address becomes IPv4, IPv6 is compressed), so that one host cannot be registered twice
    /// under two spellings.
    fn address(&mut self, field: &str, value: &mut String) {
        match value.parse::<IpAddr>() {
            Ok(address) => *value = address.to_canonical().to_string(),
            Err(_) => self.add(
                field,
                "must be an IPv4 or IPv6 address, for example 10.0.0.1 or ::1",
            ),
        }
    }

    /// Refuses VCL that would read files or run code on a Varnish host, naming each line.
    fn forbidden_constructs(&mut self, field: &str, vcl: &str) {
        for found in vaas_vcl::rules::forbidden_constructs(vcl) {
            self.add(field, format!("line {}: {}", found.line, found.what));
        }
    }

    /// Checks a list's length before its items are looked at.
    fn list_length(&mut self, field: &str, length: usize, max_items: usize) -> bool {
        let ok = length <= max_items;
        self.check(ok, field, &format!("must hold at most {max_items} items"));
        ok
    }

    /// Checks a VCL identifier: a letter, then letters, digits or "_", and not a name Varnish
    /// reserves for itself ("vcl", "vcl_…").
    fn vcl_identifier(&mut self, field: &str, value: &str, max_chars: usize) {
        let well_formed = value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && value.len() <= max_chars
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let lower = value.to_ascii_lowercase();
        if !well_formed {
            self.add(
                field,
                format!(
                    "must be a letter followed by at most {} ASCII letters, digits or \"_\"",
                    max_chars - 1
                ),
            );
        } else if lower == "vcl" || lower.starts_with("vcl_") {
            self.add(
                field,
                "must not be \"vcl\" or start with \"vcl_\" (reserved by Varnish)",
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
        let normalised = (0..1_000_000_000).contains(&duration.nanos);
        let positive = duration.seconds > 0 || (duration.seconds == 0 && duration.nanos > 0);
        if !normalised || duration.nanos % 1_000_000 != 0 {
            // VCL durations are written in seconds with at most three decimals; varnishd refuses
            // more digits ("Too many digits for real").
            self.add(
                field,
                "must be whole milliseconds (nanos a multiple of 1000000 below 1e9)",
            );
        } else if !positive || duration.seconds >= max_secs {
            self.add(
                field,
                format!("must be more than 0 and less than {max_secs} seconds"),
            );
        }
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
    let labels_fit = violations.list_length("labels", cluster.labels.len(), MAX_TAGS);
    for (index, label) in cluster.labels.iter().enumerate().filter(|_| labels_fit) {
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
    } else {
        violations.forbidden_constructs("content", &template.content);
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
    violations.address("address", &mut server.address);
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
    server.unsafe_settings.clear();
    server.cc_command.clear();
    violations.finish(server)
}

/// Validates a director. Its name becomes part of VCL identifiers and its route expression a
/// VCL long string, so both are held to what VCL can carry safely.
pub fn director(mut director: Director, intent: Intent) -> Result<Director, ApiError> {
    let mut violations = Violations::new("director");
    violations.id(intent, &mut director.id);
    violations.vcl_identifier("name", &director.name, 50);
    violations.text("service", &director.service, false, 128);
    if violations.list_length("cluster_ids", director.cluster_ids.len(), MAX_LIST_ITEMS) {
        for (index, &cluster_id) in director.cluster_ids.iter().enumerate() {
            violations.reference(&format!("cluster_ids[{index}]"), cluster_id);
        }
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
    for (field, id) in [
        ("probe_id", director.probe_id),
        ("time_profile_id", director.time_profile_id),
    ] {
        violations.check(
            id >= 0,
            field,
            "must be 0 (none) or the id of an existing resource",
        );
    }
    violations.enumeration(
        "protocol",
        DirectorProtocol::try_from(director.protocol).is_ok(),
    );
    if director.protocol == DirectorProtocol::Unspecified as i32 {
        director.protocol = DirectorProtocol::Http as i32;
    }
    violations.enumeration(
        "hashing_policy",
        DirectorHashingPolicy::try_from(director.hashing_policy).is_ok(),
    );
    if director.hashing_policy == DirectorHashingPolicy::Unspecified as i32 {
        director.hashing_policy = DirectorHashingPolicy::Url as i32;
    }
    for (field, value) in [
        ("service_mesh_label", &director.service_mesh_label),
        ("service_tag", &director.service_tag),
    ] {
        if !value.is_empty() {
            violations.name(field, value, &['_', '-', '.'], 128);
        }
    }
    violations.finish(director)
}

/// Validates a backend.
pub fn backend(mut backend: Backend, intent: Intent) -> Result<Backend, ApiError> {
    let mut violations = Violations::new("backend");
    violations.id(intent, &mut backend.id);
    violations.reference("director_id", backend.director_id);
    violations.reference("dc_id", backend.dc_id);
    violations.address("address", &mut backend.address);
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
    if violations.list_length("tags", backend.tags.len(), MAX_TAGS) {
        for (index, tag) in backend.tags.iter().enumerate() {
            violations.name(&format!("tags[{index}]"), tag, &['_', '-', ':', '.'], 64);
        }
    }
    violations.finish(backend)
}

/// Validates a probe. Its name becomes a VCL identifier and its URL a VCL string, so both are
/// held to what VCL can carry; the numbers to what varnishd accepts (threshold ≤ window ≤ 64).
pub fn probe(mut probe: Probe, intent: Intent) -> Result<Probe, ApiError> {
    let mut violations = Violations::new("probe");
    violations.id(intent, &mut probe.id);
    violations.vcl_identifier("name", &probe.name, 50);
    let url_ok = probe.url.starts_with('/')
        && probe.url.len() <= 256
        && probe
            .url
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    violations.check(
        url_ok,
        "url",
        "must be a path starting with \"/\": at most 256 printable ASCII characters without spaces, quotes or backslashes",
    );
    let expected = *probe.expected_response.get_or_insert(200);
    violations.check(
        (100..=599).contains(&expected),
        "expected_response",
        "must be an HTTP status from 100 to 599",
    );
    violations.duration("interval", &mut probe.interval, 3000, 301);
    if probe.interval.is_some_and(|interval| {
        interval.seconds < 1 || (interval.seconds == 300 && interval.nanos > 0)
    }) {
        violations.add("interval", "must be from 1 to 300 seconds");
    }
    violations.duration("timeout", &mut probe.timeout, 1000, 6);
    if probe.timeout.is_some_and(|timeout| {
        (timeout.seconds == 0 && timeout.nanos < 100_000_000)
            || (timeout.seconds == 5 && timeout.nanos > 0)
    }) {
        violations.add("timeout", "must be from 0.1 to 5 seconds");
    }
    let window = *probe.window.get_or_insert(5);
    violations.check((1..=64).contains(&window), "window", "must be from 1 to 64");
    let threshold = *probe.threshold.get_or_insert(3);
    violations.check(
        threshold >= 1 && threshold <= window,
        "threshold",
        "must be from 1 to window",
    );
    violations.finish(probe)
}

/// Validates a time profile and fills in the documented defaults.
pub fn time_profile(mut profile: TimeProfile, intent: Intent) -> Result<TimeProfile, ApiError> {
    let mut violations = Violations::new("time_profile");
    violations.id(intent, &mut profile.id);
    violations.text("name", &profile.name, true, 128);
    violations.text("description", &profile.description, false, 1000);
    let max_connections = *profile.max_connections.get_or_insert(5);
    violations.check(
        (1..=100_000).contains(&max_connections),
        "max_connections",
        "must be from 1 to 100000",
    );
    violations.duration("connect_timeout", &mut profile.connect_timeout, 300, 300);
    violations.duration(
        "first_byte_timeout",
        &mut profile.first_byte_timeout,
        5000,
        3600,
    );
    violations.duration(
        "between_bytes_timeout",
        &mut profile.between_bytes_timeout,
        1000,
        3600,
    );
    violations.duration(
        "service_mesh_timeout",
        &mut profile.service_mesh_timeout,
        300_000,
        3600,
    );
    violations.finish(profile)
}

/// The tags a template block can replace: the renderer's list.
pub const BLOCK_TAGS: &[&str] = vaas_vcl::OVERRIDABLE_TAGS;

/// Largest accepted template block, in bytes.
pub const MAX_BLOCK_BYTES: usize = 256 * 1024;

/// Validates a VCL variable. Its value is written into VCL as it is, so it may hold nothing that
/// could change the VCL's structure: no quotes, braces, backslashes, semicolons or control
/// characters.
pub fn vcl_variable(mut variable: VclVariable, intent: Intent) -> Result<VclVariable, ApiError> {
    let mut violations = Violations::new("vcl_variable");
    violations.id(intent, &mut variable.id);
    violations.reference("cluster_id", variable.cluster_id);
    violations.name("key", &variable.key, &['_'], 64);
    let value_ok = variable.value.chars().count() <= 254
        && variable
            .value
            .chars()
            .all(|c| !c.is_control() && !matches!(c, '"' | '{' | '}' | '\\' | ';'));
    violations.check(
        value_ok,
        "value",
        "must be at most 254 characters without control characters, quotes, braces, backslashes or semicolons",
    );
    let assembles_forbidden = variable
        .value
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .any(|word| {
            let word = word.to_ascii_lowercase();
            matches!(
                word.as_str(),
                "include" | "import" | "from" | "std.fileread"
            ) || word.starts_with("debug.")
                || word.starts_with("vtc.")
        });
    violations.check(
        !assembles_forbidden,
        "value",
        "must not hold include, import, from, std.fileread or a debug/vtc call, which could read files or run code on a Varnish host",
    );
    violations.finish(variable)
}

/// Validates a template block: a known tag and content under the template content rules.
pub fn vcl_template_block(
    mut block: VclTemplateBlock,
    intent: Intent,
) -> Result<VclTemplateBlock, ApiError> {
    let mut violations = Violations::new("vcl_template_block");
    violations.id(intent, &mut block.id);
    violations.reference("template_id", block.template_id);
    if !BLOCK_TAGS.contains(&block.tag.as_str()) {
        violations.add("tag", format!("must be one of {}", BLOCK_TAGS.join(", ")));
    }
    if block.content.len() > MAX_BLOCK_BYTES {
        violations.add(
            "content",
            format!("must be at most {MAX_BLOCK_BYTES} bytes"),
        );
    } else if block.content.contains('\0') {
        violations.add("content", "must not contain NUL characters");
    } else {
        violations.forbidden_constructs("content", &block.content);
    }
    violations.finish(block)
}

/// Most conditions of a route.
pub const MAX_ROUTE_CONDITIONS: usize = 8;

/// Most positive URLs of a route.
pub const MAX_POSITIVE_URLS: usize = 20;

/// Longest positive URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

/// Validates a route: every condition as the renderer writes it (so an accepted route compiles),
/// the priority, the clusters or "in sync", and the positive URLs as absolute http(s) URLs.
/// Whether those URLs reach the route's director is checked by the store, inside the write.
pub fn route(mut route: Route, intent: Intent) -> Result<Route, ApiError> {
    let mut violations = Violations::new("route");
    violations.id(intent, &mut route.id);
    if route.conditions.is_empty() {
        violations.add("conditions", "must hold at least one condition");
    } else if violations.list_length("conditions", route.conditions.len(), MAX_ROUTE_CONDITIONS) {
        for (index, condition) in route.conditions.iter().enumerate() {
            if let Err(reason) = vaas_vcl::routing::check_condition(condition) {
                let (field, reason) = reason.split_once(' ').unwrap_or((&reason, ""));
                violations.add(&format!("conditions[{index}].{field}"), reason);
            }
        }
    }
    violations.check(
        (1..=500).contains(&route.priority),
        "priority",
        "must be from 1 (first) to 500",
    );
    if route.clusters_in_sync {
        violations.check(
            route.cluster_ids.is_empty(),
            "cluster_ids",
            "must be empty when clusters_in_sync is true",
        );
    } else if route.cluster_ids.is_empty() {
        violations.add(
            "cluster_ids",
            "must name at least one cluster, or set clusters_in_sync",
        );
    } else if violations.list_length("cluster_ids", route.cluster_ids.len(), MAX_LIST_ITEMS) {
        for (index, &cluster_id) in route.cluster_ids.iter().enumerate() {
            violations.reference(&format!("cluster_ids[{index}]"), cluster_id);
        }
    }
    violations.reference("director_id", route.director_id);
    violations.enumeration("action", RouteAction::try_from(route.action).is_ok());
    if route.action == RouteAction::Unspecified as i32 {
        route.action = RouteAction::Pass as i32;
    }
    if violations.list_length(
        "positive_urls",
        route.positive_urls.len(),
        MAX_POSITIVE_URLS,
    ) {
        for (index, url) in route.positive_urls.iter().enumerate() {
            let field = format!("positive_urls[{index}]");
            if url.len() > MAX_URL_BYTES {
                violations.add(&field, format!("must be at most {MAX_URL_BYTES} bytes"));
            } else if let Err(reason) = vaas_vcl::routing::Request::from_absolute_url(url) {
                violations.add(&field, reason);
            }
        }
    }
    violations.text("description", &route.description, false, 1000);
    violations.finish(route)
}

/// Most mappings of a domain mapping.
pub const MAX_MAPPINGS: usize = 32;

/// Most assertions of a redirect.
pub const MAX_ASSERTIONS: usize = 20;

/// Validates a domain mapping: the domain as a host name, each mapping as its type reads it
/// (host names and templates lower-cased), and the clusters.
pub fn domain_mapping(
    mut mapping: DomainMapping,
    intent: Intent,
) -> Result<DomainMapping, ApiError> {
    let mut violations = Violations::new("domain_mapping");
    violations.id(intent, &mut mapping.id);
    mapping.domain = mapping.domain.to_ascii_lowercase();
    let domain_ok = vaas_vcl::redirects::is_host(&mapping.domain) && !mapping.domain.contains(':');
    violations.check(
        domain_ok,
        "domain",
        "must be a host name: at most 253 letters, digits, \"-\", \".\" or \"_\"",
    );
    violations.enumeration("type", DomainMappingType::try_from(mapping.r#type).is_ok());
    if mapping.r#type == DomainMappingType::Unspecified as i32 {
        mapping.r#type = DomainMappingType::Static as i32;
    }
    let kind = mapping.r#type();
    if mapping.mappings.is_empty() {
        violations.add("mappings", "must hold at least one mapping");
    } else if violations.list_length("mappings", mapping.mappings.len(), MAX_MAPPINGS) {
        for (index, entry) in mapping.mappings.iter_mut().enumerate() {
            if kind != DomainMappingType::StaticRegex {
                *entry = entry.to_ascii_lowercase();
            }
            if let Err(reason) = vaas_vcl::redirects::check_mapping(kind, entry) {
                violations.add(&format!("mappings[{index}]"), reason);
            }
        }
    }
    if violations.list_length("cluster_ids", mapping.cluster_ids.len(), MAX_LIST_ITEMS) {
        for (index, &cluster_id) in mapping.cluster_ids.iter().enumerate() {
            violations.reference(&format!("cluster_ids[{index}]"), cluster_id);
        }
    }
    violations.text("description", &mapping.description, false, 1000);
    violations.finish(mapping)
}

/// Validates a redirect: condition, destination, status (default 301), priority, required
/// header and assertions as the renderer writes and checks them. Whether the assertions hold is
/// checked by the store, inside the write.
pub fn redirect(mut redirect: Redirect, intent: Intent) -> Result<Redirect, ApiError> {
    let mut violations = Violations::new("redirect");
    violations.id(intent, &mut redirect.id);
    violations.reference("source_domain_id", redirect.source_domain_id);
    if redirect.status == 0 {
        redirect.status = 301;
    }
    if redirect
        .required_header
        .as_ref()
        .is_some_and(|header| header.name.is_empty() && header.value.is_empty())
    {
        redirect.required_header = None;
    }
    if let Err((field, reason)) = vaas_vcl::redirects::check_redirect(&redirect) {
        violations.add(field, reason);
    }
    violations.check(
        (1..=500).contains(&redirect.priority),
        "priority",
        "must be from 1 (first) to 500",
    );
    if violations.list_length("assertions", redirect.assertions.len(), MAX_ASSERTIONS) {
        for (index, assertion) in redirect.assertions.iter().enumerate() {
            let field = format!("assertions[{index}].given_url");
            if assertion.given_url.len() > MAX_URL_BYTES {
                violations.add(&field, format!("must be at most {MAX_URL_BYTES} bytes"));
            } else if let Err(reason) =
                vaas_vcl::routing::Request::from_absolute_url(&assertion.given_url)
            {
                violations.add(&field, reason);
            }
            let location = &assertion.expected_location;
            if location.is_empty() || location.len() > MAX_URL_BYTES {
                violations.add(
                    &format!("assertions[{index}].expected_location"),
                    format!("must be 1 to {MAX_URL_BYTES} bytes"),
                );
            } else {
                violations.text(
                    &format!("assertions[{index}].expected_location"),
                    location,
                    true,
                    MAX_URL_BYTES,
                );
            }
        }
    }
    violations.text("description", &redirect.description, false, 1000);
    violations.finish(redirect)
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

    #[test]
    fn probes_get_defaults_and_keep_threshold_within_window() {
        let probe = probe(
            Probe {
                name: "health".into(),
                url: "/health".into(),
                ..Default::default()
            },
            Intent::Create,
        )
        .unwrap();
        assert_eq!(probe.expected_response, Some(200));
        assert_eq!(probe.interval.map(|d| d.seconds), Some(3));
        assert_eq!((probe.window, probe.threshold), (Some(5), Some(3)));

        let bad = Probe {
            name: "vcl_probe".into(),
            url: "/x\"; include \"/etc/passwd".into(),
            expected_response: Some(99),
            interval: Some(Duration {
                seconds: 301,
                nanos: 0,
            }),
            timeout: Some(Duration {
                seconds: 0,
                nanos: 50_000_000,
            }),
            window: Some(2),
            threshold: Some(3),
            ..Default::default()
        };
        assert_eq!(
            violations(super::probe(bad, Intent::Create).unwrap_err()),
            [
                "probe.name",
                "probe.url",
                "probe.expected_response",
                "probe.interval",
                "probe.timeout",
                "probe.threshold"
            ]
        );
    }

    #[test]
    fn durations_must_be_whole_milliseconds() {
        let profile = |nanos| TimeProfile {
            name: "p".into(),
            connect_timeout: Some(Duration { seconds: 0, nanos }),
            ..Default::default()
        };
        assert!(time_profile(profile(300_000_000), Intent::Create).is_ok());
        for nanos in [300_000_001, 1_000_000_000, -1] {
            assert_eq!(
                violations(time_profile(profile(nanos), Intent::Create).unwrap_err()),
                ["time_profile.connect_timeout"],
                "nanos {nanos}"
            );
        }
    }

    #[test]
    fn addresses_are_stored_in_one_spelling() {
        let backend = |address: &str| {
            super::backend(
                Backend {
                    address: address.into(),
                    director_id: 1,
                    dc_id: 1,
                    ..Default::default()
                },
                Intent::Create,
            )
            .unwrap()
            .address
        };
        assert_eq!(backend("::ffff:127.0.0.1"), "127.0.0.1");
        assert_eq!(
            backend("2001:0db8:0000:0000:0000:0000:0000:0001"),
            "2001:db8::1"
        );
    }

    #[test]
    fn lists_are_bounded() {
        let director = Director {
            name: "d".into(),
            route_expression: "^/".into(),
            cluster_ids: vec![1; MAX_LIST_ITEMS + 1],
            ..Default::default()
        };
        assert_eq!(
            violations(super::director(director, Intent::Create).unwrap_err()),
            ["director.cluster_ids"],
            "one violation for the list, not one per item"
        );
    }

    #[test]
    fn variable_values_cannot_change_the_vcl_structure() {
        let variable = |key: &str, value: &str| {
            vcl_variable(
                VclVariable {
                    cluster_id: 1,
                    key: key.into(),
                    value: value.into(),
                    ..Default::default()
                },
                Intent::Create,
            )
        };
        assert!(variable("MESH_IP", "10.0.0.1").is_ok());
        assert!(variable("URL", "https://example.com/x?a=1").is_ok());
        for value in [
            "a\"b",
            "a;b",
            "a{b",
            "a}b",
            "a\\b",
            "a\nb",
            &"x".repeat(255),
        ] {
            assert_eq!(
                violations(variable("K", value).unwrap_err()),
                ["vcl_variable.value"],
                "{value:?}"
            );
        }
        assert_eq!(
            violations(variable("no-dash", "v").unwrap_err()),
            ["vcl_variable.key"]
        );
    }

    #[test]
    fn blocks_replace_only_known_tags_within_the_size_limit() {
        let block = |tag: &str, content: String| {
            vcl_template_block(
                VclTemplateBlock {
                    template_id: 1,
                    tag: tag.into(),
                    content,
                    ..Default::default()
                },
                Intent::Create,
            )
        };
        assert!(block("RECV", "sub vcl_recv { }".into()).is_ok());
        assert_eq!(
            violations(block("VAAS_STATUS", String::new()).unwrap_err()),
            ["vcl_template_block.tag"]
        );
        assert_eq!(
            violations(block("ACL", "x".repeat(MAX_BLOCK_BYTES + 1)).unwrap_err()),
            ["vcl_template_block.content"]
        );
    }

    #[test]
    fn templates_that_read_files_or_run_code_are_refused_naming_the_line() {
        let template = |content: &str| {
            vcl_template(
                VclTemplate {
                    name: "t".into(),
                    content: content.into(),
                    ..Default::default()
                },
                Intent::Create,
            )
        };
        let error = template("<VCL/>\nsub vcl_recv {\n  C{ system(\"id\"); }C\n}\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid request: vcl_template.content: line 3: inline C runs code on the Varnish host"
        );
        assert!(template("<VCL/>\ninclude \"/etc/passwd\";").is_err());
        assert!(template("<VCL/>\n# include is fine in a comment\n").is_ok());
        let variable = vcl_variable(
            VclVariable {
                cluster_id: 1,
                key: "K".into(),
                value: "std.fileread".into(),
                ..Default::default()
            },
            Intent::Create,
        );
        assert_eq!(violations(variable.unwrap_err()), ["vcl_variable.value"]);
    }

    #[test]
    fn a_route_reports_every_bad_field_and_defaults_its_action() {
        use vaas_proto::v1::{RouteCondition, RouteLeft, RouteOperator};
        let condition =
            |left: RouteLeft, header: &str, operator: RouteOperator, value: &str| RouteCondition {
                left: left as i32,
                header: header.into(),
                operator: operator as i32,
                value: value.into(),
            };
        let good = Route {
            conditions: vec![condition(
                RouteLeft::Url,
                "",
                RouteOperator::Matches,
                "^/a/",
            )],
            priority: 1,
            clusters_in_sync: true,
            director_id: 3,
            positive_urls: vec!["https://example.com/a/b".into()],
            ..Default::default()
        };
        let accepted = route(good.clone(), Intent::Create).expect("a valid route");
        assert_eq!(accepted.action, RouteAction::Pass as i32);
        let bad = Route {
            conditions: vec![
                condition(RouteLeft::Header, "Bad Name", RouteOperator::Equal, "x"),
                condition(RouteLeft::Url, "", RouteOperator::Matches, "("),
                condition(RouteLeft::CanaryRandom, "", RouteOperator::Less, "200"),
            ],
            priority: 501,
            cluster_ids: vec![1],
            director_id: 0,
            positive_urls: vec!["/relative".into()],
            ..good.clone()
        };
        assert_eq!(
            violations(route(bad, Intent::Create).unwrap_err()),
            [
                "route.conditions[0].header",
                "route.conditions[1].value",
                "route.conditions[2].value",
                "route.priority",
                "route.cluster_ids",
                "route.director_id",
                "route.positive_urls[0]",
            ]
        );
        let unbounded = Route {
            conditions: vec![good.conditions[0].clone(); MAX_ROUTE_CONDITIONS + 1],
            clusters_in_sync: false,
            ..good
        };
        assert_eq!(
            violations(route(unbounded, Intent::Create).unwrap_err()),
            ["route.conditions", "route.cluster_ids"]
        );
    }

    #[test]
    fn a_domain_mapping_is_lower_cased_and_read_as_its_type() {
        let mapping = |kind: DomainMappingType, mappings: &[&str]| DomainMapping {
            domain: "Example.COM".into(),
            mappings: mappings.iter().map(|m| (*m).to_owned()).collect(),
            r#type: kind as i32,
            ..Default::default()
        };
        let accepted = domain_mapping(
            mapping(DomainMappingType::Dynamic, &["Shop.{env}.Example.com"]),
            Intent::Create,
        )
        .expect("a valid dynamic mapping");
        assert_eq!(accepted.domain, "example.com");
        assert_eq!(accepted.mappings, ["shop.{env}.example.com"]);
        for (kind, bad) in [
            (DomainMappingType::Static, "a b.com"),
            (DomainMappingType::Static, "a.com\"}"),
            (DomainMappingType::StaticRegex, "(unclosed"),
            (DomainMappingType::Dynamic, "shop.{env.example.com"),
        ] {
            assert_eq!(
                violations(domain_mapping(mapping(kind, &[bad]), Intent::Create).unwrap_err()),
                ["domain_mapping.mappings[0]"],
                "{bad}"
            );
        }
        assert_eq!(
            violations(
                domain_mapping(mapping(DomainMappingType::Static, &[]), Intent::Create)
                    .unwrap_err()
            ),
            ["domain_mapping.mappings"]
        );
    }

    #[test]
    fn a_redirect_is_held_to_what_the_vcl_can_carry() {
        let good = Redirect {
            source_domain_id: 1,
            condition: "^/old/(.*)$".into(),
            rewrite_groups: true,
            destination: "https://example.com/\\1".into(),
            priority: 1,
            ..Default::default()
        };
        assert_eq!(
            redirect(good.clone(), Intent::Create)
                .expect("valid")
                .status,
            301
        );
        for (bad, field) in [
            (
                Redirect {
                    condition: "a\"}b".into(),
                    ..good.clone()
                },
                "redirect.condition",
            ),
            (
                Redirect {
                    destination: "https://e.com/\\0".into(),
                    ..good.clone()
                },
                "redirect.destination",
            ),
            (
                Redirect {
                    rewrite_groups: false,
                    ..good.clone()
                },
                "redirect.destination",
            ),
            (
                Redirect {
                    destination: "ftp://e.com/".into(),
                    ..good.clone()
                },
                "redirect.destination",
            ),
            (
                Redirect {
                    status: 303,
                    ..good.clone()
                },
                "redirect.status",
            ),
            (
                Redirect {
                    priority: 0,
                    ..good.clone()
                },
                "redirect.priority",
            ),
            (
                Redirect {
                    required_header: Some(vaas_proto::v1::RedirectHeader {
                        name: "X Bad".into(),
                        value: String::new(),
                    }),
                    ..good.clone()
                },
                "redirect.required_header.name",
            ),
            (
                Redirect {
                    assertions: vec![vaas_proto::v1::RedirectAssertion {
                        given_url: "example.com/x".into(),
                        expected_location: "https://example.com/x".into(),
                    }],
                    ..good.clone()
                },
                "redirect.assertions[0].given_url",
            ),
        ] {
            assert_eq!(
                violations(redirect(bad, Intent::Create).unwrap_err()),
                [field]
            );
        }
    }
}
