//! The built-in bodies of the template tags.

use std::collections::HashMap;
use std::fmt::Write as _;

use vaas_proto::v1::{
    DirectorHashingPolicy, DirectorMode, DirectorRouter, RouteAction, RouteOperator,
};

use crate::model::{DirectorPlan, Plan};
use crate::redirects::{HTTPS_REASON, Hosts, LOCATION_HEADER, REDIRECT_REASON};
use crate::routing::{
    CANARY_HEADER, CANARY_RANGE, ConditionRule, FORWARDED_PROTO_HEADER, Left, RouteRule,
};
use crate::template::Blocks;

/// Name of the placeholder backend. Declared first, it is Varnish's default backend, so it counts
/// as referenced and keeps the VCL valid when the cluster has no backend at all. Port 9 (discard)
/// on the loopback refuses connections: a request that reaches it fails fast with a 503.
pub(crate) const PLACEHOLDER_BACKEND: &str = "vaas_no_backend";

/// What a tag expands to.
pub(crate) enum Expansion<'a> {
    /// Generated text, inserted as is (never scanned for tags again).
    Leaf(&'a str),
    /// Template text made of further tags, expanded in turn.
    Composite(&'static str),
}

/// The built-in body of `VCL`.
const VCL_BODY: &str = "<HEADERS/>\n\n<BACKENDS/>\n\n<DIRECTORS/>\n\n<RECV/>\n\n<VCL_PIPE/>\n\n\
                        <OTHER_FUNCTIONS/>\n\n<EMPTY_DIRECTOR_SYNTH/>\n";
/// The built-in body of `VCL` when the template has an `ACL` block.
const VCL_BODY_WITH_ACL: &str = "<HEADERS/>\n\n<ACL/>\n\n<BACKENDS/>\n\n<DIRECTORS/>\n\n<RECV/>\n\n\
                                 <VCL_PIPE/>\n\n<OTHER_FUNCTIONS/>\n\n<EMPTY_DIRECTOR_SYNTH/>\n";
/// The built-in body of `VCL_PIPE`: a piped request keeps its `Upgrade` and `Connection`
/// headers, so WebSocket handshakes reach the backend (varnishd sets `Connection: close` on
/// every piped request otherwise).
const VCL_PIPE_BODY: &str = "sub vcl_pipe {\n    if (req.http.upgrade) {\n        \
                             set bereq.http.upgrade = req.http.upgrade;\n        \
                             set bereq.http.connection = req.http.connection;\n    }\n}";
/// The built-in body of `RECV`.
const RECV_BODY: &str = "sub vcl_recv {\n    <VAAS_STATUS/>\n    <ROUTER/>\n}";
/// The built-in body of `RECV` when the template has a `PROPER_PROTOCOL_REDIRECT` block: the
/// block's own subroutines come first (Varnish runs concatenated `vcl_recv` bodies in order).
const RECV_BODY_WITH_PROTOCOL_REDIRECT: &str =
    "<PROPER_PROTOCOL_REDIRECT/>\n\nsub vcl_recv {\n    <VAAS_STATUS/>\n    <ROUTER/>\n}";

/// The bodies of every built-in tag for one server.
pub(crate) struct Leaves {
    vcl: &'static str,
    recv: &'static str,
    headers: String,
    backends: String,
    directors: String,
    vaas_status: String,
    router: String,
    flexible_router: String,
    other_functions: String,
    empty_director_synth: String,
    /// `DIRECTOR_<NAME>`, `SET_BACKEND_<NAME>` and `USE_DIRECTOR_<NAME>` of every director
    /// (virtual ones included), by tag.
    per_director: HashMap<String, String>,
}

impl Leaves {
    /// Generates every leaf tag of `plan`; `version` is written where the VCL version appears.
    /// `ACL` and `PROPER_PROTOCOL_REDIRECT` have no built-in body: `VCL` and `RECV` name them
    /// only when the template has a block for them, so that such a block takes effect in a
    /// template that is just `<VCL/>` and every other VCL stays as it was.
    pub(crate) fn new(plan: &Plan, version: &str, blocks: &Blocks) -> Leaves {
        Leaves {
            vcl: if blocks.contains("ACL") {
                VCL_BODY_WITH_ACL
            } else {
                VCL_BODY
            },
            recv: if blocks.contains("PROPER_PROTOCOL_REDIRECT") {
                RECV_BODY_WITH_PROTOCOL_REDIRECT
            } else {
                RECV_BODY
            },
            headers: headers(plan),
            backends: backends(plan),
            directors: directors(plan),
            vaas_status: vaas_status(plan),
            router: router(plan),
            flexible_router: flexible_router(plan),
            other_functions: other_functions(version),
            empty_director_synth: empty_director_synth(plan, version),
            per_director: per_director(plan),
        }
    }

    /// Returns the expansion of `tag`, `None` when the tag is unknown.
    pub(crate) fn get(&self, tag: &str) -> Option<Expansion<'_>> {
        let expansion = match tag {
            "VCL" => Expansion::Composite(self.vcl),
            "RECV" => Expansion::Composite(self.recv),
            "HEADERS" => Expansion::Leaf(&self.headers),
            "BACKENDS" => Expansion::Leaf(&self.backends),
            "DIRECTORS" => Expansion::Leaf(&self.directors),
            "VAAS_STATUS" => Expansion::Leaf(&self.vaas_status),
            "ROUTER" => Expansion::Leaf(&self.router),
            "FLEXIBLE_ROUTER" => Expansion::Leaf(&self.flexible_router),
            "OTHER_FUNCTIONS" => Expansion::Leaf(&self.other_functions),
            "EMPTY_DIRECTOR_SYNTH" => Expansion::Leaf(&self.empty_director_synth),
            "VCL_PIPE" => Expansion::Leaf(VCL_PIPE_BODY),
            _ => return self.per_director.get(tag).map(|body| Expansion::Leaf(body)),
        };
        Some(expansion)
    }
}

/// The per-director tags, named with the director's name upper-cased (names are unique
/// regardless of case): `DIRECTOR_<NAME>` is a backend expression (the director's own-DC
/// object, or the placeholder backend when it has no backends) for `req.backend_hint` or
/// `std.healthy()`; `SET_BACKEND_<NAME>` the statements that choose its backend, with the DC
/// fall-back and its HTTPS redirect (or its 404); `USE_DIRECTOR_<NAME>` those and its
/// `remove_path` rewrite, as the router does when it picks the director.
fn per_director(plan: &Plan) -> HashMap<String, String> {
    let mut tags = HashMap::new();
    for director in &plan.directors {
        let name = director.name.to_ascii_uppercase();
        let expression = director.groups.first().map_or_else(
            || PLACEHOLDER_BACKEND.to_owned(),
            |group| backend_call(director, &group.object_name),
        );
        let mut set_backend = String::new();
        let chosen = choose_backend(director, &mut set_backend);
        let mut use_director = set_backend.clone();
        if chosen {
            remove_path(director, &mut use_director);
        }
        tags.insert(format!("DIRECTOR_{name}"), expression);
        tags.insert(format!("SET_BACKEND_{name}"), outdent(&set_backend));
        tags.insert(format!("USE_DIRECTOR_{name}"), outdent(&use_director));
    }
    tags
}

/// Turns statements written for the inside of a block ("\n    stmt" lines) into text placed
/// where a tag stands (its indentation is the tag's).
fn outdent(statements: &str) -> String {
    statements
        .strip_prefix('\n')
        .unwrap_or(statements)
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rewrites the URL of a path router with `remove_path` once its backend is chosen.
fn remove_path(director: &DirectorPlan, out: &mut String) {
    if director.remove_path && director.router != DirectorRouter::Domain {
        let _ = write!(
            out,
            "\n    set req.url = regsub(req.url, {{\"{}\"}}, \"/\");",
            director.route_expression
        );
    }
}

fn headers(plan: &Plan) -> String {
    format!("vcl {};\n\nimport std;\nimport directors;", plan.syntax)
}

fn backends(plan: &Plan) -> String {
    let mut out = String::new();
    // Probes first: a backend can only name a probe declared before it.
    for probe in &plan.probes {
        // The URL was checked: printable ASCII without `"`.
        let _ = write!(
            out,
            "probe {} {{\n    .url = \"{}\";\n    .expected_response = {};\n    \
             .interval = {};\n    .timeout = {};\n    .window = {};\n    \
             .threshold = {};\n    .initial = {};\n}}\n\n",
            probe.vcl_name,
            probe.url,
            probe.expected_response,
            probe.interval,
            probe.timeout,
            probe.window,
            probe.threshold,
            probe.initial,
        );
    }
    let _ = write!(
        out,
        "# The default backend, never reachable: it keeps the VCL valid without backends.\n\
         backend {PLACEHOLDER_BACKEND} {{\n    .host = \"127.0.0.1\";\n    .port = \"9\";\n}}"
    );
    for backend in &plan.backends {
        let limits = &backend.limits;
        let _ = write!(
            out,
            "\n\nbackend {} {{\n    .host = \"{}\";\n    .port = \"{}\";\n    \
             .max_connections = {};\n    .connect_timeout = {};\n    \
             .first_byte_timeout = {};\n    .between_bytes_timeout = {};",
            backend.vcl_name,
            backend.host,
            backend.port,
            limits.max_connections,
            limits.connect_timeout,
            limits.first_byte_timeout,
            limits.between_bytes_timeout,
        );
        if let Some(probe) = &backend.probe {
            let _ = write!(out, "\n    .probe = {probe};");
        }
        out.push_str("\n}");
    }
    out
}

fn directors(plan: &Plan) -> String {
    let mut out = String::from("sub vcl_init {");
    for director in &plan.directors {
        let constructor = match director.mode {
            DirectorMode::Random => "random",
            DirectorMode::Hash => "hash",
            DirectorMode::Fallback => "fallback",
            DirectorMode::RoundRobin | DirectorMode::Unspecified => "round_robin",
        };
        let weighted = matches!(director.mode, DirectorMode::Random | DirectorMode::Hash);
        for group in &director.groups {
            let _ = write!(
                out,
                "\n    new {} = directors.{constructor}();",
                group.object_name
            );
            for (backend, weight) in &group.members {
                if weighted {
                    let _ = write!(
                        out,
                        "\n    {}.add_backend({backend}, {weight}.0);",
                        group.object_name
                    );
                } else {
                    let _ = write!(out, "\n    {}.add_backend({backend});", group.object_name);
                }
            }
        }
    }
    out.push_str("\n}");
    out
}

/// Answers `/vaas_status`, and `/vaas_version` (in the top VCL of a split render, the VCL of
/// the version label answers it).
fn vaas_status(plan: &Plan) -> String {
    let version_answer = match &plan.version_label {
        Some(label) => format!("return (vcl({label}));"),
        None => "return (synth(200, \"vaas_version\"));".to_owned(),
    };
    format!(
        "if (req.url == \"/vaas_status\" && (req.method == \"GET\" || req.method == \"HEAD\")) {{\n    \
         return (synth(200, \"vaas_status\"));\n}}\n\
         if (req.url == \"/vaas_version\" && (req.method == \"GET\" || req.method == \"HEAD\")) {{\n    \
         {version_answer}\n}}"
    )
}

/// The director's `.backend()` call: hash directors hash the URL, or the cookie header when
/// their hashing policy says so.
fn backend_call(director: &DirectorPlan, object_name: &str) -> String {
    match (director.mode, director.hashing_policy) {
        (DirectorMode::Hash, DirectorHashingPolicy::Cookie) => {
            format!("{object_name}.backend(req.http.cookie)")
        }
        (DirectorMode::Hash, _) => format!("{object_name}.backend(req.url)"),
        _ => format!("{object_name}.backend()"),
    }
}

/// The reason (and body) of the 404 for a request no route and no director takes.
pub(crate) const NO_DIRECTOR_REASON: &str = "no director matches the request";

/// The reason (and body) of the 404 of a director without usable backends.
pub(crate) fn empty_director_reason(director: &str) -> String {
    format!("director {director} has no backends")
}

/// Sets the backend hint to `director`'s own-DC group, falling back to the other DCs' groups
/// while the chosen backend is sick; a director without backends answers a synthetic 404 naming
/// it, and a director with a label (the top VCL of a split render) hands the request to the VCL
/// of that label. Returns whether a backend was chosen here.
fn choose_backend(director: &DirectorPlan, out: &mut String) -> bool {
    if director.https_only {
        let _ = write!(
            out,
            "\n    if (req.http.{FORWARDED_PROTO_HEADER} != \"https\") {{\n        \
             return (synth(301, \"{HTTPS_REASON}\"));\n    }}"
        );
    }
    if let Some(label) = &director.label {
        let _ = write!(out, "\n    return (vcl({label}));");
        return false;
    }
    let Some((first, others)) = director.groups.split_first() else {
        let _ = write!(
            out,
            "\n    return (synth(404, \"{}\"));",
            empty_director_reason(&director.name)
        );
        return false;
    };
    let _ = write!(
        out,
        "\n    set req.backend_hint = {};",
        backend_call(director, &first.object_name)
    );
    for other in others {
        let _ = write!(
            out,
            "\n    if (!std.healthy(req.backend_hint)) {{\n        \
             set req.backend_hint = {};\n    }}",
            backend_call(director, &other.object_name)
        );
    }
    true
}

/// The VCL of one route condition. Values were checked: no control character and no `"}`, so
/// they fit a long string; header names are letters, digits and "-"; canary numbers integers.
fn condition_vcl(condition: &ConditionRule) -> String {
    let subject = match &condition.left {
        Left::Url => "req.url".to_owned(),
        Left::Host => "req.http.host".to_owned(),
        Left::Header(name) => format!("req.http.{name}"),
        Left::CanaryRandom => format!("std.integer(req.http.{CANARY_HEADER}, 0)"),
    };
    let operator = match condition.operator {
        RouteOperator::NotEqual => "!=",
        RouteOperator::Matches => "~",
        RouteOperator::NotMatches => "!~",
        RouteOperator::Less => "<",
        RouteOperator::Greater => ">",
        RouteOperator::Equal | RouteOperator::Unspecified => "==",
    };
    if condition.left == Left::CanaryRandom {
        format!("{subject} {operator} {}", condition.value)
    } else {
        format!("{subject} {operator} {{\"{}\"}}", condition.value)
    }
}

/// The routes, by priority: the first whose conditions all hold chooses its director and passes
/// or pipes the request. The canary random number is drawn once, before the first route.
fn routes(plan: &Plan, out: &mut String) {
    let routes = &plan.routing.routes;
    let canary = routes.iter().any(RouteRule::uses_canary_random);
    if canary {
        let _ = writeln!(
            out,
            "set req.http.{CANARY_HEADER} = std.integer(real = std.random(0, {CANARY_RANGE}));"
        );
    }
    let directors: HashMap<&str, &DirectorPlan> = plan
        .directors
        .iter()
        .map(|director| (director.name.as_str(), director))
        .collect();
    for route in routes {
        let Some(director) = directors.get(route.director.as_str()) else {
            continue;
        };
        let conditions: Vec<String> = route.conditions.iter().map(condition_vcl).collect();
        let _ = write!(
            out,
            "# route {}\nif ({}) {{",
            route.id,
            conditions.join(" && ")
        );
        if canary {
            let _ = write!(out, "\n    unset req.http.{CANARY_HEADER};");
        }
        if choose_backend(director, out) {
            let action = match route.action {
                RouteAction::Pipe => "pipe",
                _ => "pass",
            };
            let _ = write!(out, "\n    return ({action});");
        }
        out.push_str("\n}\n");
    }
    if canary {
        let _ = writeln!(out, "unset req.http.{CANARY_HEADER};");
    }
}

/// The redirects, by domain group: the group's host test around its redirects, each setting the
/// Location header and answering through `vcl_synth`. Values were checked: conditions,
/// destinations and header values fit a long string, header names are letters, digits and "-".
fn redirects(plan: &Plan, out: &mut String) {
    for group in &plan.routing.redirects.groups {
        let hosts: Vec<String> = match &group.hosts {
            Hosts::Exact(names) => names
                .iter()
                .map(|name| format!("std.tolower(req.http.host) == {{\"{name}\"}}"))
                .collect(),
            Hosts::Patterns(patterns) => patterns
                .iter()
                .map(|(expression, _)| format!("std.tolower(req.http.host) ~ {{\"{expression}\"}}"))
                .collect(),
        };
        let _ = write!(
            out,
            "# redirects of {} (domain mapping {})\nif ({}) {{",
            group.domain,
            group.mapping_id,
            hosts.join(" || ")
        );
        for redirect in &group.redirects {
            let mut condition = format!("req.url ~ {{\"{}\"}}", redirect.condition);
            match &redirect.required_header {
                Some((name, value)) if value.is_empty() => {
                    let _ = write!(condition, " && req.http.{name}");
                }
                Some((name, value)) => {
                    let _ = write!(condition, " && req.http.{name} == {{\"{value}\"}}");
                }
                None => {}
            }
            let location = if redirect.rewrite_groups {
                // The whole URL is replaced, the destination's \1..\9 by the condition's groups.
                format!(
                    "regsub(req.url, {{\"^.*?(?:{}).*$\"}}, {{\"{}\"}})",
                    redirect.condition, redirect.destination
                )
            } else {
                format!("{{\"{}\"}}", redirect.destination)
            };
            let _ = write!(
                out,
                "\n    # redirect {}\n    if ({condition}) {{\n        \
                 set req.http.{LOCATION_HEADER} = {location};",
                redirect.id
            );
            if redirect.preserve_query {
                let _ = write!(
                    out,
                    "\n        if (req.url ~ \"\\?\") {{\n            \
                     set req.http.{LOCATION_HEADER} = req.http.{LOCATION_HEADER} + \"{}\" + \
                     regsub(req.url, \"^[^?]*\\?\", \"\");\n        }}",
                    redirect.query_separator()
                );
            }
            let _ = write!(
                out,
                "\n        return (synth({}, \"{REDIRECT_REASON}\"));\n    }}",
                redirect.status
            );
        }
        out.push_str("\n}\n");
    }
}

/// The body of `FLEXIBLE_ROUTER`: the redirects, then the routes.
fn flexible_router(plan: &Plan) -> String {
    let mut out = String::new();
    redirects(plan, &mut out);
    routes(plan, &mut out);
    out.truncate(out.trim_end().len());
    out
}

fn router(plan: &Plan) -> String {
    let mut out = flexible_router(plan);
    if !out.is_empty() {
        out.push('\n');
    }
    let mut chain = String::new();
    // Virtual directors are only declared, for custom templates to use.
    for director in plan.directors.iter().filter(|director| director.routed) {
        let by_path = director.router != DirectorRouter::Domain;
        let subject = if by_path { "req.url" } else { "req.http.host" };
        let keyword = if chain.is_empty() { "if" } else { " elsif" };
        // The expression was checked: it holds no `"}` and no control character.
        let _ = write!(
            chain,
            "{keyword} ({subject} ~ {{\"{}\"}}) {{",
            director.route_expression
        );
        // After the choice, so a hash director hashes the URL the client asked for.
        if choose_backend(director, &mut chain) {
            remove_path(director, &mut chain);
        }
        chain.push_str("\n}");
    }
    let no_route = format!("return (synth(404, \"{NO_DIRECTOR_REASON}\"));");
    if chain.is_empty() {
        out.push_str(&no_route);
    } else {
        let _ = write!(out, "{chain} else {{\n    {no_route}\n}}");
    }
    out
}

fn other_functions(version: &str) -> String {
    format!("sub vcl_deliver {{\n    set resp.http.X-VaaS-VCL-Version = \"{version}\";\n}}")
}

fn empty_director_synth(plan: &Plan, version: &str) -> String {
    let (status_code, status_reason) = if plan.active {
        (200, "OK")
    } else {
        (503, "Maintenance")
    };
    format!(
        "sub vcl_synth {{\n    \
         set resp.http.X-VaaS-VCL-Version = \"{version}\";\n    \
         set resp.http.Content-Type = \"text/plain; charset=utf-8\";\n    \
         if (resp.reason == \"vaas_status\") {{\n        \
         set resp.status = {status_code};\n        \
         set resp.reason = \"{status_reason}\";\n    \
         }} elsif (resp.reason == \"vaas_version\") {{\n        \
         set resp.reason = \"OK\";\n        \
         set resp.body = \"{version}\";\n        \
         return (deliver);\n    \
         }} elsif (resp.reason == \"{REDIRECT_REASON}\" || resp.reason == \"{HTTPS_REASON}\") {{\n        \
         if (resp.reason == \"{HTTPS_REASON}\") {{\n            \
         set resp.http.Location = \"https://\" + req.http.host + req.url;\n        \
         }} else {{\n            \
         set resp.http.Location = req.http.{LOCATION_HEADER};\n        \
         }}\n        \
         if (resp.status == 301) {{\n            \
         set resp.reason = \"Moved Permanently\";\n        \
         }} elsif (resp.status == 302) {{\n            \
         set resp.reason = \"Found\";\n        \
         }} elsif (resp.status == 307) {{\n            \
         set resp.reason = \"Temporary Redirect\";\n        \
         }} else {{\n            \
         set resp.reason = \"Permanent Redirect\";\n        \
         }}\n        \
         set resp.body = resp.http.Location;\n        \
         return (deliver);\n    \
         }}\n    \
         set resp.body = resp.reason;\n    \
         return (deliver);\n}}"
    )
}
