//! Split rendering: one server's VCL as a small top VCL plus shard VCLs, so that a change to one
//! director's backends recompiles only its shard.
//!
//! Varnish's `return (vcl(label))` in `vcl_recv` hands a request to the VCL a label points to,
//! rolled back to what the client sent (headers, URL and every `req` setting as received), and
//! that VCL runs from its own `vcl_recv` on. The split uses that:
//!
//! - **Top VCL** (the active one): the whole built-in template without backends or `vcl_init`
//!   objects. It answers `/vaas_status`, runs the redirects, the routes and the router, answers
//!   every synthetic response (redirects, HTTPS redirects, 404s), and where the single VCL would
//!   choose a director's backend it returns `vcl(vaas_shard_<n>)`, the label of the shard
//!   holding that director; `/vaas_version` goes to the label [`VERSION_LABEL`].
//! - **Shard VCLs**: the same template with the backends, probes and directors of the directors
//!   whose name hashes to the shard, the routes to those directors and the router entries of
//!   those directors, in the same order, and no redirects. The request it receives is the one the
//!   top routed, and no earlier route or router entry matched it there, so the first match among
//!   the shard's (a subset, in the same order) is the director the top chose: backends, DC
//!   fall-back, `remove_path`, pass and pipe happen exactly as in the single VCL.
//!
//! - **Version VCL**: answers `/vaas_version` with the server's version, [`SplitVcl::version`],
//!   a hash of the top's and every shard's version.
//!
//! The labels are stable (one per shard number, and the version label), so the top VCL's text
//! does not change when only backends do: a backend change compiles its shard and the tiny
//! version VCL, and the agent moves their labels at commit. A director's shard number depends
//! on its name only, so moving labels one after the other never sends a request to a shard that
//! lacks its director (except, for a moment, a director created or deleted by that change).
//!
//! **What differs from the single VCL**: a response a shard serves carries the shard's version in
//! `X-VaaS-VCL-Version`, a synthetic response of the top VCL the top's version; `/vaas_version`
//! answers the server's version as the single VCL does. The shards' backends are listed under
//! their shard VCLs' names, and a commit that changes several shards switches them one after
//! the other (each switch is atomic) instead of all at once.
//!
//! **Templates that are not split** (rendered as one VCL): a template other than `<VCL/>`, or
//! one with template blocks (custom text could branch on the backends or restart), a cluster with
//! a route on the canary random number (drawn once per request: the shard would draw again), and
//! a server with fewer backends than [`SplitOptions::min_backends`] (below that, one compile is
//! faster than several).

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use vaas_proto::v1::ClusterSnapshot;

use crate::model::Plan;
use crate::routing::RouteRule;
use crate::{RenderError, RenderedVcl, write_vcl};

/// How a server's VCL is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitOptions {
    /// How many shards the directors are hashed into (at least 1).
    pub shards: usize,
    /// Servers with fewer backends than this are rendered as one VCL.
    pub min_backends: usize,
}

impl Default for SplitOptions {
    /// 32 shards from 1,000 backends: at 5,000 backends a shard holds ~160 of them and compiles
    /// in 0.5-0.8 s, while the first load of every shard costs 19 s against 16 s for one VCL;
    /// at 1,000 backends 11 s against 2.4 s, which is why smaller servers are not split
    /// (BENCHMARKS.md, "Incremental reloads").
    fn default() -> SplitOptions {
        SplitOptions {
            shards: 32,
            min_backends: 1000,
        }
    }
}

/// A server's VCL split into a top VCL, shard VCLs and a version VCL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitVcl {
    /// The VCL to activate.
    pub top: RenderedVcl,
    /// The shard VCLs with their shard numbers: each is labelled [`shard_label`] of its number.
    pub shards: Vec<(usize, RenderedVcl)>,
    /// The VCL labelled [`VERSION_LABEL`], answering `/vaas_version`; its `version` is the
    /// server's version.
    pub version_vcl: RenderedVcl,
}

impl SplitVcl {
    /// The server's version: a hash of the top's and every shard's version.
    pub fn version(&self) -> &str {
        &self.version_vcl.version
    }
}

/// The label the top VCL hands requests for `/vaas_version` to.
pub const VERSION_LABEL: &str = "vaas_version";

/// The label the top VCL hands requests for the directors of shard `index` to.
pub fn shard_label(index: usize) -> String {
    format!("vaas_shard_{index}")
}

/// Renders the VCL of server `server_id` split into shards, or `None` when this server's VCL is
/// not split (see the module documentation) and [`crate::render`] applies.
pub fn render_split(
    snapshot: &ClusterSnapshot,
    server_id: i64,
    options: SplitOptions,
) -> Result<Option<SplitVcl>, RenderError> {
    let crate::Inputs {
        plan,
        template,
        blocks,
        variables,
    } = crate::Inputs::read(snapshot, server_id)?;
    let splittable = template.content.trim() == "<VCL/>"
        && blocks.is_empty()
        && !plan
            .routing
            .routes
            .iter()
            .any(RouteRule::uses_canary_random)
        && plan.backends.len() >= options.min_backends;
    if !splittable {
        return Ok(None);
    }
    let shard_count = options.shards.max(1);
    // Only directors the router can choose: virtual ones are declared for custom templates,
    // which are not split, and a shard of them alone would have a label nothing names.
    let mut by_shard: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    let routed = plan
        .directors
        .iter()
        .filter(|d| d.routed && !d.groups.is_empty());
    for director in routed {
        by_shard
            .entry(shard_of(&director.name, shard_count))
            .or_default()
            .insert(director.name.as_str());
    }
    let mut shards = Vec::with_capacity(by_shard.len());
    for (index, names) in &by_shard {
        let plan = shard_plan(&plan, names);
        shards.push((
            *index,
            write_vcl(&template.content, &plan, &blocks, &variables)?,
        ));
    }
    // The top VCL: the server's plan without backends, each routed director handing its
    // requests to its shard.
    let mut top = plan;
    top.backends.clear();
    top.probes.clear();
    top.version_label = Some(VERSION_LABEL.to_owned());
    for director in &mut top.directors {
        if !director.groups.is_empty() {
            director.label = Some(shard_label(shard_of(&director.name, shard_count)));
            director.groups.clear();
        }
    }
    let syntax = top.syntax;
    let top = write_vcl(&template.content, &top, &blocks, &variables)?;
    let version_vcl = version_vcl(syntax, &top, &shards);
    Ok(Some(SplitVcl {
        top,
        shards,
        version_vcl,
    }))
}

/// The VCL answering `/vaas_version` as the single VCL does: 200, reason OK, the version as
/// plain text and in `X-VaaS-VCL-Version`.
fn version_vcl(syntax: &str, top: &RenderedVcl, shards: &[(usize, RenderedVcl)]) -> RenderedVcl {
    let mut parts = format!("top {}\n", top.version);
    for (index, shard) in shards {
        parts.push_str(&format!("shard {index} {}\n", shard.version));
    }
    let version = crate::version_of(&parts);
    let listing: Vec<String> = shards
        .iter()
        .map(|(index, shard)| format!("#   shard {index}: {}", shard.version))
        .collect();
    let text = format!(
        "vcl {syntax};\n\n\
         # The version of a split VCL, from its top VCL {top} and its shards:\n{listing}\n\n\
         backend {placeholder} {{\n    .host = \"127.0.0.1\";\n    .port = \"9\";\n}}\n\n\
         sub vcl_recv {{\n    return (synth(200, \"vaas_version\"));\n}}\n\n\
         sub vcl_synth {{\n    \
         set resp.http.X-VaaS-VCL-Version = \"{version}\";\n    \
         set resp.http.Content-Type = \"text/plain; charset=utf-8\";\n    \
         set resp.reason = \"OK\";\n    \
         set resp.body = \"{version}\";\n    \
         return (deliver);\n}}\n",
        top = top.version,
        listing = listing.join("\n"),
        placeholder = crate::emit::PLACEHOLDER_BACKEND,
    );
    RenderedVcl { text, version }
}

/// The shard of a director: a stable hash of its name (names are unique regardless of case).
fn shard_of(name: &str, shard_count: usize) -> usize {
    let digest = Sha256::digest(name.to_ascii_lowercase().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % shard_count as u64) as usize
}

/// The plan of one shard: the named directors with their backends and probes, the routes to
/// them and their router entries, in the same order; no redirects. Built from the parts it
/// keeps, without copying the rest of the server's plan.
fn shard_plan(plan: &Plan, directors: &BTreeSet<&str>) -> Plan {
    let kept: Vec<_> = plan
        .directors
        .iter()
        .filter(|director| directors.contains(director.name.as_str()))
        .cloned()
        .collect();
    let members: BTreeSet<&str> = kept
        .iter()
        .flat_map(|director| &director.groups)
        .flat_map(|group| &group.members)
        .map(|(backend, _)| backend.as_str())
        .collect();
    let backends: Vec<_> = plan
        .backends
        .iter()
        .filter(|backend| members.contains(backend.vcl_name.as_str()))
        .cloned()
        .collect();
    let used: BTreeSet<&str> = backends
        .iter()
        .filter_map(|backend| backend.probe.as_deref())
        .collect();
    Plan {
        template_id: plan.template_id,
        syntax: plan.syntax,
        active: plan.active,
        probes: plan
            .probes
            .iter()
            .filter(|probe| used.contains(probe.vcl_name.as_str()))
            .cloned()
            .collect(),
        backends,
        directors: kept,
        routing: plan.routing.for_directors(directors),
        version_label: None,
    }
}
