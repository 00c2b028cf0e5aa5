//! Split rendering: one server's VCL as a small top VCL plus shard VCLs, so that a change to one
//! director's backends recompiles only its shard.
//!
//! Varnish's `return (vcl(label))` in `vcl_recv` hands a request to the VCL a label points to,
//! rolled back to what the client sent (headers, URL and every `req` setting as received), and
//! that VCL runs from its own `vcl_recv` on. The split uses that:
//!
//! - **Top VCL** (the active one): the whole built-in template without backends or `vcl_init`
//!   objects. It answers `/vaas_status` and `/vaas_version`, runs the redirects, the routes and
//!   the router, answers every synthetic response (redirects, HTTPS redirects, 404s), and where
//!   the single VCL would choose a director's backend it returns `vcl(vaas_l_<version>)`, the
//!   label of the shard holding that director.
//! - **Shard VCLs**: the same template with the backends, probes and directors of the directors
//!   whose name hashes to the shard, the routes to those directors and the router entries of
//!   those directors, in the same order, and no redirects. The request it receives is the one the
//!   top routed, and no earlier route or router entry matched it there, so the first match among
//!   the shard's (a subset, in the same order) is the director the top chose: backends, DC
//!   fall-back, `remove_path`, pass and pipe happen exactly as in the single VCL.
//!
//! A shard's label is named after the shard VCL's version (`vaas_l_<version>`), so the top VCL's
//! text, and therefore its version, covers every shard: the top's version is the server's
//! version, and an unchanged shard keeps its label and is not compiled again. Loading a new top
//! never changes what an existing label serves, so the two phases of a reload hold.
//!
//! **What differs from the single VCL**: a response a shard serves carries the shard's version in
//! `X-VaaS-VCL-Version` (the top's version is in every synthetic response and in
//! `/vaas_version`); the shards' backends are listed under their shard VCLs' names.
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
use crate::{RenderError, RenderedVcl, template, variables, write_vcl};

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
    /// in a few hundred milliseconds, while the first load of all shards costs about what one
    /// VCL would (BENCHMARKS.md, "Incremental reloads").
    fn default() -> SplitOptions {
        SplitOptions {
            shards: 32,
            min_backends: 1000,
        }
    }
}

/// A server's VCL split into a top VCL and shard VCLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitVcl {
    /// The VCL to activate; its version is the server's version.
    pub top: RenderedVcl,
    /// The shard VCLs, by shard: each must be loaded and labelled [`shard_label`] of its
    /// version before the top VCL is loaded.
    pub shards: Vec<RenderedVcl>,
}

/// The label the top VCL hands requests to for the shard VCL of `version`.
pub fn shard_label(version: &str) -> String {
    format!("vaas_l_{version}")
}

/// Renders the VCL of server `server_id` split into shards, or `None` when this server's VCL is
/// not split (see the module documentation) and [`crate::render`] applies.
pub fn render_split(
    snapshot: &ClusterSnapshot,
    server_id: i64,
    options: SplitOptions,
) -> Result<Option<SplitVcl>, RenderError> {
    let plan = Plan::build(snapshot, server_id)?;
    let template = snapshot
        .templates
        .iter()
        .find(|template| template.id == plan.template_id)
        .ok_or(RenderError::TemplateNotFound {
            server_id,
            template_id: plan.template_id,
        })?;
    let variables = variables::Variables::new(&snapshot.variables)?;
    let blocks = template::Blocks::of_template(&snapshot.template_blocks, template.id);
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
    let mut by_shard: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    for director in plan.directors.iter().filter(|d| !d.groups.is_empty()) {
        by_shard
            .entry(shard_of(&director.name, shard_count))
            .or_default()
            .insert(director.name.as_str());
    }
    let mut shards = Vec::with_capacity(by_shard.len());
    let mut label_of_director: BTreeMap<&str, String> = BTreeMap::new();
    for names in by_shard.values() {
        let shard = write_vcl(
            &template.content,
            &shard_plan(&plan, names),
            &blocks,
            &variables,
        )?;
        let label = shard_label(&shard.version);
        for name in names {
            label_of_director.insert(name, label.clone());
        }
        shards.push(shard);
    }
    let mut top = plan.clone();
    top.backends.clear();
    top.probes.clear();
    for director in &mut top.directors {
        if !director.groups.is_empty() {
            director.label = label_of_director.get(director.name.as_str()).cloned();
            director.groups.clear();
        }
    }
    let top = write_vcl(&template.content, &top, &blocks, &variables)?;
    Ok(Some(SplitVcl { top, shards }))
}

/// The shard of a director: a stable hash of its name (names are unique regardless of case).
fn shard_of(name: &str, shard_count: usize) -> usize {
    let digest = Sha256::digest(name.to_ascii_lowercase().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % shard_count as u64) as usize
}

/// The plan of one shard: the named directors with their backends and probes, the routes (the
/// emitter leaves out routes to directors not in the plan), no redirects.
fn shard_plan(plan: &Plan, directors: &BTreeSet<&str>) -> Plan {
    let mut shard = plan.clone();
    shard
        .directors
        .retain(|director| directors.contains(director.name.as_str()));
    let members: BTreeSet<&str> = shard
        .directors
        .iter()
        .flat_map(|director| &director.groups)
        .flat_map(|group| &group.members)
        .map(|(backend, _)| backend.as_str())
        .collect();
    shard
        .backends
        .retain(|backend| members.contains(backend.vcl_name.as_str()));
    let probes: BTreeSet<&str> = shard
        .backends
        .iter()
        .filter_map(|backend| backend.probe.as_deref())
        .collect();
    let kept_probes: Vec<_> = plan
        .probes
        .iter()
        .filter(|probe| probes.contains(probe.vcl_name.as_str()))
        .cloned()
        .collect();
    shard.probes = kept_probes;
    shard.routing.redirects.groups.clear();
    shard
}
