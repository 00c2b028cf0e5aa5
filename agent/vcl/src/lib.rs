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
//! | `VCL` | `<HEADERS/>`, `<BACKENDS/>`, `<DIRECTORS/>`, `<RECV/>`, `<OTHER_FUNCTIONS/>`, `<EMPTY_DIRECTOR_SYNTH/>` |
//! | `HEADERS` | `vcl 4.0;` or `vcl 4.1;`, `import std;`, `import directors;` |
//! | `BACKENDS` | a placeholder backend (first, so it is the default and always referenced), then one `backend` per usable backend |
//! | `DIRECTORS` | `sub vcl_init` creating one directors-vmod director per director and datacenter |
//! | `RECV` | `sub vcl_recv { <VAAS_STATUS/> <ROUTER/> }` |
//! | `VAAS_STATUS` | answers `/vaas_status` and `/vaas_version` |
//! | `ROUTER` | picks a director by host, then by path; falls back to other datacenters; synthetic 404 otherwise |
//! | `OTHER_FUNCTIONS` | `sub vcl_deliver` adding the `X-VaaS-VCL-Version` header to proxied responses |
//! | `EMPTY_DIRECTOR_SYNTH` | `sub vcl_synth`: the version header and plain-text bodies of every synthetic response |
//!
//! Most templates are just `<VCL/>`; a custom one mixes the sub-tags into its own VCL (Varnish
//! concatenates several definitions of the same `sub`). A tag this crate does not know is left in
//! the text inside a `/* ... */` comment. Then `#{key}` variables are substituted in the template
//! text: `MESH_IP`, `MESH_PORT` and `MESH_TIMEOUT_CONTROL_HEADER` have built-in defaults; an unknown
//! variable is left as written.
//!
//! # Version
//!
//! The version of a VCL is the first 16 hex digits of the SHA-256 of its text, computed with a
//! placeholder where the version itself appears, then substituted.

mod emit;
mod model;
mod names;
mod template;

use sha2::{Digest, Sha256};
use vaas_proto::v1::ClusterSnapshot;

/// The placeholder written where the version appears, replaced once the hash is known.
const VERSION_PLACEHOLDER: &str = "@VAAS_VCL_VERSION@";

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
    /// Two generated VCL symbols (backends, directors) have the same name.
    #[error("two vcl objects would be named {name}")]
    NameCollision {
        /// The duplicated name.
        name: String,
    },
}

/// Renders the VCL of server `server_id` from `snapshot`.
///
/// The output is deterministic: the same snapshot always gives the same text and version.
pub fn render(snapshot: &ClusterSnapshot, server_id: i64) -> Result<RenderedVcl, RenderError> {
    let plan = model::Plan::build(snapshot, server_id)?;
    let template = snapshot
        .templates
        .iter()
        .find(|template| template.id == plan.template_id)
        .ok_or(RenderError::TemplateNotFound {
            server_id,
            template_id: plan.template_id,
        })?;
    let leaves = emit::Leaves::new(&plan, VERSION_PLACEHOLDER);
    let content = template::substitute_variables(&template.content);
    let with_placeholder = template::expand(&content, &leaves);
    let version = version_of(&with_placeholder);
    Ok(RenderedVcl {
        text: with_placeholder.replace(VERSION_PLACEHOLDER, &version),
        version,
    })
}

/// Returns the first 16 hex digits of the SHA-256 of `text`.
fn version_of(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut version = hex::encode(digest);
    version.truncate(16);
    version
}
