//! Renders the VCL of one Varnish server from a [`ClusterSnapshot`]: a pure function, snapshot in,
//! text out.
//!
//! The agent calls [`render`] before loading a VCL, and the API can call it for previews. This crate
//! does no I/O and knows nothing of varnishd: proving that the text compiles is the job of the
//! agent's tests against a real varnishd.
//!
//! # Templates
//!
//! A template's content is VCL text with tags written `<TAG/>`. Tags expand level by level, like the
//! original VaaS:
//!
//! | tag | expands to |
//! |---|---|
//! | `VCL` | `<HEADERS/>`, `<ACL/>` (only when the template has an `ACL` block), `<BACKENDS/>`, `<DIRECTORS/>`, `<RECV/>`, `<VCL_PIPE/>`, `<OTHER_FUNCTIONS/>`, `<EMPTY_DIRECTOR_SYNTH/>` |
//! | `HEADERS` | `vcl 4.0;` or `vcl 4.1;`, `import std;`, `import directors;` |
//! | `ACL` | nothing built in: only a block gives it content |
//! | `BACKENDS` | one `probe` per probe that a backend below uses, a placeholder backend (the first backend, so it is the default and always referenced), then one `backend` per usable backend |
//! | `DIRECTORS` | `sub vcl_init` creating one directors-vmod director per director (virtual ones included) and datacenter |
//! | `RECV` | `<PROPER_PROTOCOL_REDIRECT/>` (only when the template has a block for it), then `sub vcl_recv { <VAAS_STATUS/> <ROUTER/> }` |
//! | `PROPER_PROTOCOL_REDIRECT` | nothing built in: only a block gives it content |
//! | `VAAS_STATUS` | answers `/vaas_status` and `/vaas_version` |
//! | `ROUTER` | `FLEXIBLE_ROUTER`, then picks a non-virtual director by host, then by path; falls back to other datacenters; strips the matched path when asked; synthetic 404 otherwise |
//! | `FLEXIBLE_ROUTER` | the redirects (by domain group), then the routes (by priority) |
//! | `VCL_PIPE` | `sub vcl_pipe` keeping a piped request's `Upgrade` and `Connection` headers (WebSockets) |
//! | `DIRECTOR_<NAME>` | the director's own-DC object as a backend expression (`api_fra.backend()`), the placeholder backend when it has none |
//! | `SET_BACKEND_<NAME>` | the statements choosing the director's backend: its HTTPS redirect, the DC fall-back, or its 404 |
//! | `USE_DIRECTOR_<NAME>` | `SET_BACKEND_<NAME>` and the director's `remove_path` rewrite, as the router does |
//! | `OTHER_FUNCTIONS` | `sub vcl_deliver` adding the `X-VaaS-VCL-Version` header to proxied responses |
//! | `EMPTY_DIRECTOR_SYNTH` | `sub vcl_synth`: the version header and plain-text bodies of every synthetic response |
//!
//! Most templates are just `<VCL/>`; a custom one mixes the sub-tags into its own VCL (Varnish
//! concatenates several definitions of the same `sub`). A tag with neither a built-in body nor a
//! block (an unknown tag, or `ACL` and `PROPER_PROTOCOL_REDIRECT` without a block) is left in the
//! text inside a `/* ... */` comment. Generated text is indented like its tag when the tag starts
//! its line.
//!
//! # Template blocks
//!
//! A block (from the snapshot's `template_blocks`) replaces the built-in body of one tag for one
//! template: `VCL`, `HEADERS`, `ACL`, `BACKENDS`, `DIRECTORS`, `RECV`, `ROUTER`,
//! `PROPER_PROTOCOL_REDIRECT`, `OTHER_FUNCTIONS` or `EMPTY_DIRECTOR_SYNTH`, wherever the tag
//! appears: in the template or inside another tag's body (`<RECV/>` inside the built-in `VCL`).
//! Blocks of other templates, and blocks for any other tag (the API refuses them), are ignored.
//! A block's content is expanded like template text: it may hold further tags and variables.
//!
//! **Recursion.** A tag that is already being expanded on the current path expands to its
//! built-in body instead of its block. A block that names its own tag therefore wraps the
//! built-in body (an `OTHER_FUNCTIONS` block of `<OTHER_FUNCTIONS/>` plus a `sub vcl_deliver`
//! keeps the version header and adds its own), and blocks that name each other (a `RECV` block
//! with `<VCL/>`) end at the built-in bodies instead of recursing forever. This is not an error.
//!
//! # Variables
//!
//! `#{key}` (key: ASCII letters, digits and `_`) becomes the value of the cluster's variable of
//! that key (the snapshot's `variables`), else the built-in default (`MESH_IP` 127.0.0.1,
//! `MESH_PORT` 31001, `MESH_TIMEOUT_CONTROL_HEADER` x-service-mesh-timeout), else it is left as
//! written. Variables are substituted in template and block text only, as that text is expanded:
//! text this crate generates (backends, directors, router...) is never altered by a variable, and
//! a value is written as is, never read again for tags or variables. Every value of the cluster
//! is checked, used or not: one holding a control character, `"`, `{`, `}`, `\` or `;` is an
//! error ([`RenderError::InvalidVariableValue`]), so a variable cannot end a string, a block or a
//! statement of the VCL around it.
//!
//! # Size and work
//!
//! Expansion is one front-to-back pass over each text, linear in what it reads and writes (a
//! megabyte of `<` is read once). Both are capped at [`MAX_EXPANSION_BYTES`] (32 MiB): a template
//! that repeats `<VCL/>` enough to write more, or blocks that expand more text than that (a block
//! counts each time its tag expands, even when it writes nothing), fail fast with
//! [`RenderError::TooLarge`] instead of taking the agent's memory and time.
//!
//! # Directors and backends
//!
//! - **Probes.** A director's probe is declared once, as `probe probe_<name>` (the name
//!   lower-cased: VCL symbols are case-insensitive, and the prefix keeps it apart from backends and
//!   directors), and every backend of the director gets `.probe = probe_<name>;`. A probe that no
//!   rendered backend uses is not declared, because varnishd refuses an unused probe. Unset fields
//!   take the documented defaults (200, 3 s, 1 s, window 5, threshold 3). `.initial` is always
//!   written: `threshold` when the probe starts healthy, otherwise `threshold - 1`, Varnish's own
//!   default and what the original VaaS left in place: a backend starts sick and turns healthy on
//!   its first good probe, which varnishd sends as soon as the VCL is loaded. We do not write
//!   `0`: each VCL probes its own backends afresh, so every reload would keep every probed
//!   backend sick for `threshold × interval` (9 s by default) and a director would answer 503 for
//!   that long.
//! - **Time profiles.** A backend with `inherit_time_profile` whose director has a time profile
//!   takes `max_connections` and the three timeouts from the profile (the profile's unset fields
//!   take the same defaults as a backend's); otherwise it keeps its own. The profile's
//!   `service_mesh_timeout` is not rendered.
//! - **Hash directors** hash `req.url`, or `req.http.cookie` with the cookie hashing policy.
//! - **remove_path** (path routers only): once the backend is chosen, the first match of the
//!   route expression in the URL is replaced by "/", so `^/api/` turns `/api/x` into `/x` (and
//!   `^/api` would turn it into `//x`). An expression without `^` still replaces its first match,
//!   wherever it is. The rewrite happens in `vcl_recv`, so the rewritten URL is the cache key, as
//!   in the original VaaS: two such directors on one host whose URLs strip to the same path share
//!   cache entries. Domain routers ignore the flag.
//! - **Virtual directors** are declared (backends, probes and `vcl_init` objects) so custom
//!   templates can use them, but the router never chooses them.
//! - A director's probe or time profile missing from the snapshot, or one with an invalid value,
//!   is an error rather than a silently different VCL.
//! - **HTTPS-only directors** (`protocol` HTTPS): a request without `X-Forwarded-Proto: https`
//!   (set by the TLS terminator in front of varnishd) gets a 301 to `https://` + Host + URL
//!   before a backend is chosen. HTTP and BOTH redirect nothing: sending an HTTPS client to
//!   plain HTTP would be a downgrade.
//! - Not rendered yet: a director's `service_mesh_label`, `service_tag` and
//!   `reachable_via_service_mesh` (service-mesh routing comes later).
//!
//! # Routes and redirects
//!
//! - **Redirects** come first in `vcl_recv` (after the status endpoints), grouped by domain
//!   mapping: static and dynamic mappings (exact, lower-cased hosts compared with
//!   `std.tolower(req.http.host)`) before static_regex ones, then by mapping id; within a group
//!   by priority, then id. A dynamic mapping's `{label}` placeholders are filled from the
//!   cluster's `key:value` labels; an entry whose label the cluster lacks (or whose filled value is
//!   no host name) stands for nothing there. A matching redirect stores its Location in
//!   `X-VaaS-Location` and answers `synth(status, "vaas_redirect")`; `vcl_synth` writes the
//!   Location header. With `rewrite_groups` the whole URL is replaced by the destination, its
//!   `\1`..`\9` by the condition's groups; `preserve_query` appends the query string.
//! - **Routes** come next, by priority then id: the first whose conditions all hold chooses its
//!   director's backend (the HTTPS redirect and DC fall-back included) and returns `pass` or
//!   `pipe`. The canary random number is drawn once (`std.random(0, 100)` as an integer, into
//!   `X-VaaS-Canary-Random`, which a client cannot set) and removed before the request goes on.
//!   Routes never apply their director's `remove_path` (that is the director's expression's
//!   rewrite). A route to a director that is virtual, disabled or not in the cluster is left out.
//! - Hosts in directors' route expressions and route conditions are matched as the client sent
//!   them (with any `:port`, case as sent); only redirect domains are compared lower-cased.
//! - [`routing::RoutingTable`] makes the same decisions in Rust, for the API's checks of
//!   positive URLs and assertions and for [`explain`].
//!
//! # Version
//!
//! The version of a VCL is the first 16 hex digits of the SHA-256 of its text, computed with a
//! placeholder where the version itself appears, then substituted.
//!
//! # Split VCLs
//!
//! [`render_split`] renders a large server's VCL as a top VCL without backends and shard VCLs
//! holding the directors' backends, reached with `return (vcl(label))`, so that a backend change
//! recompiles one shard instead of every backend (see the `split` module's documentation for how
//! it serves exactly what the single VCL serves, and which templates are never split). The
//! server's version is then a hash of the top's and the shards' versions.

mod emit;
mod model;
mod names;
pub mod redirects;
pub mod routing;
pub mod rules;
mod split;
pub use split::{SplitOptions, SplitVcl, VERSION_LABEL, render_split, shard_label};
mod template;
pub use template::OVERRIDABLE_TAGS;
mod variables;

use sha2::{Digest, Sha256};
use vaas_proto::v1::ClusterSnapshot;

/// The placeholder written where the version appears, replaced once the hash is known.
const VERSION_PLACEHOLDER: &str = "@VAAS_VCL_VERSION@";

/// Expanding a template writes at most this many bytes of VCL (32 MiB), and reads at most this
/// many bytes of template and block text (a block counting each time its tag expands); beyond
/// either, [`render`] fails with [`RenderError::TooLarge`].
pub const MAX_EXPANSION_BYTES: usize = 32 << 20;

/// A rendered VCL and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedVcl {
    /// The VCL text, ready for `vcl.inline`.
    pub text: String,
    /// First 16 lower-case hex digits of the SHA-256 of the text (computed before the version was
    /// written into it).
    pub version: String,
}

/// Why a snapshot could not be rendered for a server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The server id is not among the snapshot's servers.
    #[error("server {server_id} is not in the snapshot")]
    ServerNotFound {
        /// The requested server.
        server_id: i64,
    },
    /// The server's template is not among the snapshot's templates.
    #[error("template {template_id} of server {server_id} is not in the snapshot")]
    TemplateNotFound {
        /// The server being rendered.
        server_id: i64,
        /// The missing template.
        template_id: i64,
    },
    /// A datacenter referred to by the server or a backend is missing from the snapshot.
    #[error("dc {dc_id} is not in the snapshot")]
    DcNotFound {
        /// The missing datacenter.
        dc_id: i64,
    },
    /// A datacenter symbol is empty or holds characters other than letters, digits, `_` and `-`.
    #[error("dc {dc_id} has an invalid symbol {symbol:?}")]
    InvalidDcSymbol {
        /// The datacenter.
        dc_id: i64,
        /// The symbol as stored.
        symbol: String,
    },
    /// A director name does not match `[A-Za-z][A-Za-z0-9_]{0,49}`.
    #[error("director {director_id} has an invalid name {name:?}")]
    InvalidDirectorName {
        /// The director.
        director_id: i64,
        /// The name as stored.
        name: String,
    },
    /// A route expression cannot be written safely as a VCL long string.
    #[error("route expression of director {director} {reason}")]
    InvalidRouteExpression {
        /// The director's name.
        director: String,
        /// What is wrong, for example "contains \"}\"".
        reason: String,
    },
    /// A route's condition cannot be rendered (the API refuses such a route).
    #[error("route {route_id} {reason}")]
    InvalidRoute {
        /// The route.
        route_id: i64,
        /// What is wrong, for example `conditions[0].header must be ...`.
        reason: String,
    },
    /// A domain mapping cannot be rendered (the API refuses such a mapping).
    #[error("domain mapping {mapping_id} {reason}")]
    InvalidDomainMapping {
        /// The domain mapping.
        mapping_id: i64,
        /// What is wrong.
        reason: String,
    },
    /// A redirect cannot be rendered (the API refuses such a redirect).
    #[error("redirect {redirect_id} {reason}")]
    InvalidRedirect {
        /// The redirect.
        redirect_id: i64,
        /// What is wrong.
        reason: String,
    },
    /// A backend address is not an IPv4 or IPv6 address.
    #[error("backend {backend_id} has an invalid address {address:?}")]
    InvalidAddress {
        /// The backend.
        backend_id: i64,
        /// The address as stored.
        address: String,
    },
    /// A backend port is outside 1..=65535.
    #[error("backend {backend_id} has an invalid port {port}")]
    InvalidPort {
        /// The backend.
        backend_id: i64,
        /// The port as stored.
        port: u32,
    },
    /// A backend timeout is negative or out of range.
    #[error("backend {backend_id} has an invalid {field}")]
    InvalidTimeout {
        /// The backend.
        backend_id: i64,
        /// Which timeout, for example "connect_timeout".
        field: &'static str,
    },
    /// A director refers to a probe that is not among the snapshot's probes.
    #[error("probe {probe_id} of director {director} is not in the snapshot")]
    ProbeNotFound {
        /// The director's name.
        director: String,
        /// The missing probe.
        probe_id: i64,
    },
    /// A probe name does not match `[A-Za-z][A-Za-z0-9_]{0,49}`.
    #[error("probe {probe_id} has an invalid name {name:?}")]
    InvalidProbeName {
        /// The probe.
        probe_id: i64,
        /// The name as stored.
        name: String,
    },
    /// A probe URL does not start with "/", is longer than 256 characters or holds a character
    /// other than printable ASCII (a space or `"` included).
    #[error("probe {probe_id} has an invalid url {url:?}")]
    InvalidProbeUrl {
        /// The probe.
        probe_id: i64,
        /// The URL as stored.
        url: String,
    },
    /// A probe setting is out of range: expected_response outside 100..=599, a zero, negative or
    /// unnormalised interval or timeout, window outside 1..=64, threshold outside 1..=window.
    #[error("probe {probe_id} has an invalid {field}")]
    InvalidProbeSetting {
        /// The probe.
        probe_id: i64,
        /// Which setting, for example "threshold".
        field: &'static str,
    },
    /// A director refers to a time profile that is not among the snapshot's time profiles.
    #[error("time profile {time_profile_id} of director {director} is not in the snapshot")]
    TimeProfileNotFound {
        /// The director's name.
        director: String,
        /// The missing time profile.
        time_profile_id: i64,
    },
    /// A time profile timeout is negative or out of range.
    #[error("time profile {time_profile_id} has an invalid {field}")]
    InvalidTimeProfile {
        /// The time profile.
        time_profile_id: i64,
        /// Which timeout, for example "connect_timeout".
        field: &'static str,
    },
    /// Two generated VCL symbols (probes, backends, directors) have the same name, compared
    /// regardless of case as varnishd does.
    #[error("two vcl objects would be named {name}")]
    NameCollision {
        /// The duplicated name.
        name: String,
    },
    /// A variable's value holds a control character, `"`, `{`, `}`, `\` or `;`, any of which
    /// could change the structure of the VCL around `#{key}`.
    #[error("variable {key} has an invalid value {value:?}")]
    InvalidVariableValue {
        /// The variable's key.
        key: String,
        /// The value as stored.
        value: String,
    },
    /// The rendered VCL would read files or run code on the Varnish host (see [`rules`]).
    #[error("line {line} of the rendered VCL is refused: {what}")]
    Forbidden {
        /// The line of the rendered VCL.
        line: usize,
        /// What was found there.
        what: &'static str,
    },
    /// Expanding the template would write, or read, more than [`MAX_EXPANSION_BYTES`].
    #[error("the expanded template exceeds {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// Renders the VCL of server `server_id` from `snapshot`.
///
/// The output is deterministic: the same snapshot always gives the same text and version.
pub fn render(snapshot: &ClusterSnapshot, server_id: i64) -> Result<RenderedVcl, RenderError> {
    render_plan(snapshot, server_id).map(|(_, vcl)| vcl)
}

/// Renders as [`render`] does, and returns the plan the VCL was written from.
fn render_plan(
    snapshot: &ClusterSnapshot,
    server_id: i64,
) -> Result<(model::Plan, RenderedVcl), RenderError> {
    let inputs = Inputs::read(snapshot, server_id)?;
    let vcl = write_vcl(
        &inputs.template.content,
        &inputs.plan,
        &inputs.blocks,
        &inputs.variables,
    )?;
    Ok((inputs.plan, vcl))
}

/// What rendering one server's VCL starts from: its plan, template, blocks and variables.
struct Inputs<'a> {
    plan: model::Plan,
    template: &'a vaas_proto::v1::VclTemplate,
    blocks: template::Blocks<'a>,
    variables: variables::Variables<'a>,
}

impl<'a> Inputs<'a> {
    fn read(snapshot: &'a ClusterSnapshot, server_id: i64) -> Result<Inputs<'a>, RenderError> {
        let plan = model::Plan::build(snapshot, server_id)?;
        let template = snapshot
            .templates
            .iter()
            .find(|template| template.id == plan.template_id)
            .ok_or(RenderError::TemplateNotFound {
                server_id,
                template_id: plan.template_id,
            })?;
        Ok(Inputs {
            variables: variables::Variables::new(&snapshot.variables)?,
            blocks: template::Blocks::of_template(&snapshot.template_blocks, template.id),
            template,
            plan,
        })
    }
}

/// Expands `template` for `plan`, refuses forbidden constructs and writes the version in.
fn write_vcl(
    template: &str,
    plan: &model::Plan,
    blocks: &template::Blocks<'_>,
    variables: &variables::Variables<'_>,
) -> Result<RenderedVcl, RenderError> {
    let leaves = emit::Leaves::new(plan, VERSION_PLACEHOLDER, blocks);
    let with_placeholder = template::expand(template, &leaves, blocks, variables)?;
    if let Some(found) = rules::forbidden_constructs(&with_placeholder)
        .into_iter()
        .next()
    {
        return Err(RenderError::Forbidden {
            line: found.line,
            what: found.what,
        });
    }
    let version = version_of(&with_placeholder);
    Ok(RenderedVcl {
        text: with_placeholder.replace(VERSION_PLACEHOLDER, &version),
        version,
    })
}

/// What the VCL of one server does with one request, computed from the snapshot it is rendered
/// from: the answer to "which rule, director and backends take this request?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The version of the VCL the snapshot renders for the server.
    pub version: String,
    /// The route and director the router picks.
    pub decision: routing::Decision,
    /// The chosen director's backends as this server's VCL groups them: its own datacenter
    /// first, then the datacenters it falls back to while the chosen backend is sick.
    pub backend_groups: Vec<BackendGroup>,
    /// Set when varnishd answers itself: the status and the body (the Location of a redirect,
    /// whose details are in the decision).
    pub synthetic: Option<(u16, String)>,
}

/// The backends of one director in one datacenter, as one server's VCL holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendGroup {
    /// The datacenter.
    pub dc_id: i64,
    /// The backends, in id order.
    pub backend_ids: Vec<i64>,
}

/// Explains what the VCL of server `server_id` rendered from `snapshot` does with `request`.
///
/// The version is the one the server runs with the agent's default layout: the split VCL's
/// ([`SplitVcl::version`]) when [`SplitOptions::default`] splits it, the single VCL's otherwise.
pub fn explain(
    snapshot: &ClusterSnapshot,
    server_id: i64,
    request: &routing::Request,
) -> Result<Explanation, RenderError> {
    let (plan, vcl) = render_plan(snapshot, server_id)?;
    let version = match render_split(snapshot, server_id, SplitOptions::default())? {
        Some(split) => split.version().to_owned(),
        None => vcl.version,
    };
    let decision = plan.routing.decide(request);
    let director = decision
        .director
        .as_ref()
        .and_then(|name| plan.directors.iter().find(|d| &d.name == name));
    let backend_groups: Vec<BackendGroup> = director
        .map(|director| {
            director
                .groups
                .iter()
                .map(|group| BackendGroup {
                    dc_id: group.dc_id,
                    backend_ids: group.backend_ids.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let synthetic = match (
        &decision.redirect,
        &decision.director,
        backend_groups.is_empty(),
    ) {
        (Some(redirect), _, _) => Some((redirect.status as u16, redirect.location.clone())),
        (None, None, _) => Some((404, emit::NO_DIRECTOR_REASON.to_owned())),
        (None, Some(name), true) => Some((404, emit::empty_director_reason(name))),
        (None, Some(_), false) => None,
    };
    Ok(Explanation {
        version,
        decision,
        backend_groups,
        synthetic,
    })
}

/// Returns the first 16 hex digits of the SHA-256 of `text`.
fn version_of(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut version = hex::encode(digest);
    version.truncate(16);
    version
}
