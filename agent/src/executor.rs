//! Executes the scheduler's commands against varnishd: prepare (render + `vcl.inline`), commit
//! (`vcl.use`, `start` when the child is stopped, then garbage collection) and abort
//! (`vcl.discard`). A split VCL ([`vaas_vcl::render_split`]) prepares by loading the shard VCLs
//! (`vaasd-<version>`) and the version VCL (`vaasv-<server version>`) that are not loaded yet,
//! and the top VCL (`vaas-<version>-split-...`) unless it is; its commit points the stable
//! labels at the new shard and version VCLs, then activates the top VCL. Between commands, it
//! checks that varnishd still runs what the scheduler was
//! told ([`assess`] decides) and repairs an empty varnishd or a stopped child.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};
use vaas_proto::v1::{
    AbortCommand, AbortResult, CommitCommand, CommitResult, PrepareCommand, PrepareProgress,
    PrepareResult,
};

use crate::varnish_cli::{
    ChildState, CliError, CliStatus, CliTimeouts, ParamInfo, VarnishCli, VclInfo, VclState,
};
use crate::{Config, Error};

/// Prefix of the names of the VCLs VaaS loads: `vaas-<version>-<unique suffix>`.
pub const VCL_NAME_PREFIX: &str = "vaas-";
/// Prefix of the names of shard VCLs: `vaasd-<version>`.
pub const SHARD_VCL_PREFIX: &str = "vaasd-";
/// Prefix of the names of version VCLs: `vaasv-<server version>`.
pub const VERSION_VCL_PREFIX: &str = "vaasv-";
/// Prefix of the shard labels (see [`vaas_vcl::shard_label`]).
const SHARD_LABEL_PREFIX: &str = "vaas_shard_";
/// What follows the version in the name of a split top VCL.
const SPLIT_MARK: &str = "-split-";

/// Tells whether `name` is the name of a split top VCL.
fn is_split_top(name: &str) -> bool {
    name.starts_with(VCL_NAME_PREFIX) && name.contains(SPLIT_MARK)
}

/// Tells whether `name` is one of the labels a split top VCL names.
fn is_split_label(name: &str) -> bool {
    name.starts_with(SHARD_LABEL_PREFIX) || name == vaas_vcl::VERSION_LABEL
}

/// Tells whether `name` is a shard or version VCL.
fn is_split_part(name: &str) -> bool {
    name.starts_with(SHARD_VCL_PREFIX) || name.starts_with(VERSION_VCL_PREFIX)
}
/// How many VaaS VCLs besides the active one are kept (cold) for rollback.
pub const KEPT_INACTIVE_VCLS: usize = 2;

/// Makes the suffix of VCL names loaded by this process unique even within one millisecond.
static LOAD_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Returns the VaaS version carried by a VCL name (`vaas-<16 hex digits>-...`), if any.
pub fn version_from_vcl_name(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(VCL_NAME_PREFIX)?;
    let version = rest.get(..16)?;
    let valid = version.bytes().all(|b| b.is_ascii_hexdigit())
        && matches!(rest.as_bytes().get(16), None | Some(b'-'));
    valid.then_some(version)
}

/// Builds a fresh VCL name for `version`, marked as a split top VCL when `split`.
fn fresh_vcl_name(version: &str, split: bool) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    let counter = LOAD_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mark = if split { SPLIT_MARK } else { "-" };
    format!("{VCL_NAME_PREFIX}{version}{mark}{millis}-{counter}")
}

/// A VCL the agent loaded: its name and text, and for a split VCL its other parts.
#[derive(Debug, Clone)]
struct LoadedVcl {
    name: String,
    text: String,
    split: Option<SplitParts>,
}

/// The shard VCLs and the version VCL of a split VCL.
#[derive(Debug, Clone)]
struct SplitParts {
    shards: Vec<(usize, vaas_vcl::RenderedVcl)>,
    version_vcl: vaas_vcl::RenderedVcl,
}

impl SplitParts {
    /// The server's version.
    fn version(&self) -> &str {
        &self.version_vcl.version
    }

    /// Every shard VCL and the version VCL: the label the top VCL names it by, its VCL name
    /// (after its version: a loaded VCL of that name is the same) and its text.
    fn vcls(&self) -> Vec<(String, String, &str)> {
        let shards = self.shards.iter().map(|(index, shard)| {
            (
                vaas_vcl::shard_label(*index),
                format!("{SHARD_VCL_PREFIX}{}", shard.version),
                &*shard.text,
            )
        });
        let version = (
            vaas_vcl::VERSION_LABEL.to_owned(),
            format!("{VERSION_VCL_PREFIX}{}", self.version_vcl.version),
            &*self.version_vcl.text,
        );
        shards.chain([version]).collect()
    }

    /// Every label the top VCL names, with the VCL it must point at.
    fn labels(&self) -> Vec<(String, String)> {
        self.vcls()
            .into_iter()
            .map(|(label, name, _)| (label, name))
            .collect()
    }
}

/// Tells whether `info` is a split label no loaded VCL names (left from split VCLs that are
/// gone, or from an aborted prepare).
fn is_unused_label(info: &VclInfo) -> bool {
    is_split_label(&info.name) && info.label.as_ref().is_some_and(|to| to.refs == 0)
}

/// Tells whether `info` is a shard or version VCL no label points at.
fn is_unused_part(info: &VclInfo) -> bool {
    is_split_part(&info.name) && info.status == "available" && info.labels == 0
}

/// Tells whether `label` exists in `list` and points at `target`.
fn points_at(list: &[VclInfo], label: &str, target: &str) -> bool {
    list.iter()
        .any(|info| info.name == label && info.label.as_ref().is_some_and(|to| to.name == target))
}

/// The server's version of the VCL `name` active in `list`: the version in its name, or for a
/// split top VCL the version VCL's that the version label points at.
fn running_version<'a>(list: &'a [VclInfo], name: &'a str) -> &'a str {
    if !is_split_top(name) {
        return version_from_vcl_name(name).unwrap_or_default();
    }
    list.iter()
        .find(|info| info.name == vaas_vcl::VERSION_LABEL)
        .and_then(|info| info.label.as_ref())
        .and_then(|target| target.name.strip_prefix(VERSION_VCL_PREFIX))
        .unwrap_or_default()
}

/// Renders the server's VCL: split when the configuration asks for it and the VCL can be split.
fn render_vcl(
    snapshot: &vaas_proto::v1::ClusterSnapshot,
    server_id: i64,
    split: Option<vaas_vcl::SplitOptions>,
) -> Result<(vaas_vcl::RenderedVcl, Option<SplitParts>), vaas_vcl::RenderError> {
    if let Some(options) = split
        && let Some(split) = vaas_vcl::render_split(snapshot, server_id, options)?
    {
        let parts = SplitParts {
            shards: split.shards,
            version_vcl: split.version_vcl,
        };
        return Ok((split.top, Some(parts)));
    }
    Ok((vaas_vcl::render(snapshot, server_id)?, None))
}

/// What varnishd runs, for the hello.
#[derive(Debug, Clone, Default)]
pub(crate) struct VarnishState {
    pub(crate) varnish_version: String,
    pub(crate) active_vcl_name: String,
    pub(crate) active_vcl_version: String,
    pub(crate) unsafe_settings: Vec<String>,
    /// The `cc_command` parameter: how varnishd compiles VCL.
    pub(crate) cc_command: String,
}

/// The parameters that keep configuration from reading files or running code on the host, each
/// with the value it must have (`None`: any value, as long as it is protected with `-r`).
const HARDENING: &[(&str, Option<bool>)] = &[
    ("vcc_unsafe_path", Some(false)),
    ("vcc_allow_inline_c", Some(false)),
    ("vmod_path", None),
    ("vcl_path", None),
    ("cc_command", None),
];

/// Returns what makes a varnishd with these parameters unsafe: a hardening parameter that is
/// on, or that is not protected (anyone with the admin secret could change it).
pub(crate) fn unsafe_settings(params: &[(&str, ParamInfo)]) -> Vec<String> {
    let mut findings = Vec::new();
    for (name, param) in params {
        let wanted = HARDENING
            .iter()
            .find(|(known, _)| known == name)
            .and_then(|(_, wanted)| *wanted);
        if let Some(wanted) = wanted
            && param.value.as_bool() != Some(wanted)
        {
            findings.push(format!("{name} is on"));
        }
        if !param.protected {
            findings.push(format!(
                "{name} is not read-only (start varnishd with -r {name})"
            ));
        }
    }
    findings
}

/// What a health check found wrong with varnishd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finding {
    /// No VCL is active although one was: varnishd restarted with `-f ''`; nothing is served.
    NoActiveVcl {
        /// The VCL that was active.
        expected: String,
    },
    /// The expected VCL is active but the child process is stopped; nothing is served.
    ChildStopped,
    /// Another VCL is active than the one the scheduler was last told about (varnishd
    /// restarted with a boot VCL, or someone used another one).
    OtherVcl {
        /// The VCL that is active.
        active: String,
        /// The VCL that was active.
        expected: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::NoActiveVcl { expected } => {
                write!(f, "no vcl is active where {expected} was")
            }
            Finding::ChildStopped => write!(f, "the child process is stopped"),
            Finding::OtherVcl { active, expected } => {
                write!(f, "vcl {active} is active instead of {expected}")
            }
        }
    }
}

/// The verdict of a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// varnishd serves what the scheduler was last told it serves.
    Healthy,
    /// `vcl.list` cannot tell whether the child runs: ask `status`.
    AskChild,
    /// Something is wrong.
    Unhealthy(Finding),
}

/// Decides whether varnishd is healthy from its `vcl.list`, the child's state when known, and
/// the VCL it is expected to run (the last one committed or reported in a hello; `None` when
/// the agent never saw one active, and then nothing is expected of varnishd).
pub(crate) fn assess(
    list: &[VclInfo],
    child: Option<&ChildState>,
    expected: Option<&str>,
) -> Verdict {
    let Some(expected) = expected else {
        return Verdict::Healthy;
    };
    let Some(active) = list.iter().find(|vcl| vcl.is_active()) else {
        return Verdict::Unhealthy(Finding::NoActiveVcl {
            expected: expected.to_owned(),
        });
    };
    if active.name != expected {
        return Verdict::Unhealthy(Finding::OtherVcl {
            active: active.name.clone(),
            expected: expected.to_owned(),
        });
    }
    // varnishd reports how busy a VCL is only from a running child: with the count there, one
    // round trip is enough.
    if active.busy.is_some() {
        return Verdict::Healthy;
    }
    match child {
        None => Verdict::AskChild,
        Some(ChildState::Stopped) => Verdict::Unhealthy(Finding::ChildStopped),
        // Running, or on its way ("starting"): nothing to do now.
        Some(_) => Verdict::Healthy,
    }
}

/// The outcome of a health check that found something wrong.
#[derive(Debug)]
pub(crate) struct Repair {
    /// What was found.
    pub(crate) found: Finding,
    /// What was done about it.
    pub(crate) done: String,
}

/// Owns the CLI connection (opened lazily, dropped after a transport failure so the next command
/// reconnects) and runs commands one at a time.
pub(crate) struct Executor {
    config: Config,
    cli: Option<VarnishCli>,
    /// The VCL the last prepare loaded, kept until it is committed.
    prepared: Option<LoadedVcl>,
    /// The last VCL committed (or read back from the state directory).
    last_good: Option<LoadedVcl>,
    /// The VCL varnishd should have active: the last one committed, or reported in the hello.
    expected: Option<String>,
    /// A finding the agent could not repair and already reported; not reported again until
    /// varnishd is healthy in between.
    unrepaired: Option<Finding>,
    /// Set by any CLI failure: the session checks varnishd's health at once.
    check_soon: bool,
    /// The newest scheduler term seen on a command: commands of older terms are refused.
    newest_term: i64,
}

/// File names of the last good VCL in the state directory.
const LAST_GOOD_TEXT: &str = "last-good.vcl";
const LAST_GOOD_NAME: &str = "last-good.name";
/// The last good VCL with its split parts, one JSON object (see [`kept_json`]); read before
/// the two files above, which older agents wrote.
const LAST_GOOD_JSON: &str = "last-good.json";

impl Executor {
    pub(crate) fn new(config: Config) -> Executor {
        Executor {
            config,
            cli: None,
            prepared: None,
            last_good: None,
            expected: None,
            unrepaired: None,
            check_soon: false,
            newest_term: 0,
        }
    }

    /// Admits a command of scheduler term `term`, or says why not: a leader whose term is older
    /// than one already seen has lost its lease, and must not act any more (fencing).
    pub(crate) fn admit_term(&mut self, term: i64) -> Result<(), String> {
        if term < self.newest_term {
            return Err(format!(
                "refused: the command is of scheduler term {term}, older than term {} already seen",
                self.newest_term
            ));
        }
        self.newest_term = term;
        Ok(())
    }

    /// Records the VCL active at attach (the hello's): the scheduler now knows varnishd runs
    /// it, so the health check expects it until the next commit. An empty name expects nothing.
    pub(crate) fn expect_active(&mut self, active_vcl_name: &str) {
        self.expected = (!active_vcl_name.is_empty()).then(|| active_vcl_name.to_owned());
    }

    /// Tells whether a CLI command failed since the last call.
    pub(crate) fn take_check_soon(&mut self) -> bool {
        std::mem::take(&mut self.check_soon)
    }

    /// Returns a connected CLI, connecting when needed.
    async fn cli(&mut self) -> Result<&mut VarnishCli, Error> {
        if self.cli.is_none() {
            let secret = tokio::fs::read(&self.config.varnish_secret_file)
                .await
                .map_err(|source| Error::SecretFile {
                    path: self.config.varnish_secret_file.clone(),
                    source,
                })?;
            let timeouts = CliTimeouts {
                connect: self.config.connect_timeout,
                command: self.config.cli_timeout,
                load: self.config.load_timeout,
            };
            let cli = VarnishCli::connect(self.config.varnish_admin, &secret, timeouts).await;
            if cli.is_err() {
                self.check_soon = true;
            }
            let cli = cli?;
            debug!(admin = %self.config.varnish_admin, "connected to varnishd");
            self.cli = Some(cli);
        }
        self.cli.as_mut().ok_or(Error::Cli(CliError::Broken))
    }

    /// Forgets the connection when `error` means it is unusable.
    fn note<T>(&mut self, result: Result<T, CliError>) -> Result<T, Error> {
        if result.is_err() {
            self.check_soon = true;
        }
        if let Err(error) = &result
            && !matches!(
                error,
                CliError::Command { .. } | CliError::InvalidVclName(_) | CliError::Json(_)
            )
        {
            self.cli = None;
        }
        result.map_err(Error::Cli)
    }

    /// Reads varnishd's version and active VCL.
    pub(crate) async fn varnish_state(&mut self) -> Result<VarnishState, Error> {
        let cli = self.cli().await?;
        let varnish_version = cli.varnish_version().unwrap_or_default().to_owned();
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        let active_vcl_name = list
            .iter()
            .find(|vcl| vcl.is_active())
            .map(|vcl| vcl.name.clone())
            .unwrap_or_default();
        let active_vcl_version = running_version(&list, &active_vcl_name).to_owned();
        let mut params = Vec::with_capacity(HARDENING.len());
        for (name, _) in HARDENING {
            let param = self.cli().await?.param(name).await;
            params.push((*name, self.note(param)?));
        }
        Ok(VarnishState {
            varnish_version,
            active_vcl_name,
            active_vcl_version,
            unsafe_settings: unsafe_settings(&params),
            cc_command: params
                .iter()
                .find(|(name, _)| *name == "cc_command")
                .and_then(|(_, param)| param.value.as_str())
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// Renders and loads the VCL of a prepare command.
    pub(crate) async fn prepare(
        &mut self,
        command: PrepareCommand,
        on_rendered: impl FnOnce(PrepareProgress),
    ) -> PrepareResult {
        let reload_id = command.reload_id.clone();
        let mut result = PrepareResult {
            reload_id: reload_id.clone(),
            ..Default::default()
        };
        let started = Instant::now();
        let Some(snapshot) = command.snapshot else {
            result.error = "prepare command without a snapshot".into();
            return result;
        };
        let server_id = command.server_id;
        let split = self.config.vcl_split;
        let rendered =
            tokio::task::spawn_blocking(move || render_vcl(&snapshot, server_id, split)).await;
        result.render_duration = proto_duration(started.elapsed());
        let (vcl, split) = match rendered {
            Ok(Ok(rendered)) => rendered,
            Ok(Err(error)) => {
                warn!(reload_id, server_id, %error, "render failed");
                result.error = format!("render failed: {error}");
                return result;
            }
            Err(error) => {
                result.error = format!("render task failed: {error}");
                return result;
            }
        };
        result.vcl_version = split
            .as_ref()
            .map_or(&vcl.version, |parts| &parts.version_vcl.version)
            .clone();
        on_rendered(PrepareProgress {
            reload_id: reload_id.clone(),
            render_duration: result.render_duration,
            vcl_version: result.vcl_version.clone(),
        });

        let loaded = match &split {
            Some(parts) => self.load_split(&vcl, parts, &mut result).await,
            None => self.load(&vcl, &mut result).await.map(|()| 0),
        };
        match loaded {
            Ok(compiled_shards) => {
                result.ok = true;
                info!(
                    reload_id,
                    vcl_name = result.vcl_name,
                    vcl_version = result.vcl_version,
                    unchanged = result.unchanged,
                    shards = split.as_ref().map_or(0, |parts| parts.shards.len()),
                    compiled = compiled_shards,
                    load_ms = duration_ms(&result.load_duration),
                    "prepared vcl"
                );
                self.prepared = Some(LoadedVcl {
                    name: result.vcl_name.clone(),
                    text: vcl.text,
                    split,
                });
            }
            Err(error) => {
                result.error = describe(&error);
                result.transient = may_pass(&error);
                warn!(reload_id, vcl_version = result.vcl_version, error = %result.error, transient = result.transient, "prepare failed");
            }
        }
        result
    }

    /// Loads `vcl` unless it is already active (or already loaded and available).
    async fn load(
        &mut self,
        vcl: &vaas_vcl::RenderedVcl,
        result: &mut PrepareResult,
    ) -> Result<(), Error> {
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        let same_version = |name: &str| {
            !is_split_top(name) && version_from_vcl_name(name) == Some(vcl.version.as_str())
        };
        if let Some(active) = list
            .iter()
            .find(|info| info.is_active() && same_version(&info.name))
        {
            result.vcl_name = active.name.clone();
            result.unchanged = true;
            return Ok(());
        }
        // A VCL of the same version that is still loaded (kept for rollback, or prepared by a
        // reload that did not commit) is reused: compiling it again would only cost time.
        if let Some(loaded) = list
            .iter()
            .rev()
            .find(|info| info.status == "available" && same_version(&info.name))
        {
            // A cold VCL cannot be used: warming it here keeps the commit fast.
            if loaded.state == "cold" {
                let cli = self.cli().await?;
                let warmed = cli.vcl_state(&loaded.name, VclState::Auto).await;
                self.note(warmed)?;
            }
            result.vcl_name = loaded.name.clone();
            return Ok(());
        }
        let name = fresh_vcl_name(&vcl.version, false);
        let cli = self.cli().await?;
        let started = Instant::now();
        let loaded = cli.vcl_inline(&name, &vcl.text).await;
        result.load_duration = proto_duration(started.elapsed());
        self.note(loaded)?;
        result.vcl_name = name;
        Ok(())
    }

    /// Prepares a split VCL: loads the shard and version VCLs not loaded yet, creates the
    /// labels that do not exist yet (no loaded VCL names them, so nothing served changes), and
    /// loads the top VCL unless one of its version is loaded. Moving existing labels is the
    /// commit's. Returns how many VCLs were compiled.
    async fn load_split(
        &mut self,
        top: &vaas_vcl::RenderedVcl,
        parts: &SplitParts,
        result: &mut PrepareResult,
    ) -> Result<usize, Error> {
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        let labels = parts.labels();
        let same_top = |name: &str| {
            is_split_top(name) && version_from_vcl_name(name) == Some(top.version.as_str())
        };
        let labelled = labels
            .iter()
            .all(|(label, target)| points_at(&list, label, target));
        if let Some(active) = list
            .iter()
            .find(|info| info.is_active() && same_top(&info.name))
            && labelled
        {
            result.vcl_name = active.name.clone();
            result.unchanged = true;
            return Ok(0);
        }
        let started = Instant::now();
        let loaded = self.load_split_missing(&list, top, parts).await;
        result.load_duration = proto_duration(started.elapsed());
        let (name, compiled) = loaded?;
        result.vcl_name = name;
        Ok(compiled)
    }

    /// Loads what a split VCL needs and `list` lacks: its parts, its labels that do not exist
    /// yet (no loaded VCL names them, so nothing served changes), and its top VCL unless one of
    /// its version is loaded. Returns the top VCL's name and how many VCLs were compiled.
    async fn load_split_missing(
        &mut self,
        list: &[VclInfo],
        top: &vaas_vcl::RenderedVcl,
        parts: &SplitParts,
    ) -> Result<(String, usize), Error> {
        let compiled = self.load_parts(list, parts).await?;
        self.apply_labels(list, &parts.labels(), false).await?;
        let loaded_top = list.iter().rev().find(|info| {
            info.status != "discarded"
                && is_split_top(&info.name)
                && version_from_vcl_name(&info.name) == Some(top.version.as_str())
        });
        if let Some(info) = loaded_top {
            if info.state == "cold" {
                let cli = self.cli().await?;
                let warmed = cli.vcl_state(&info.name, VclState::Auto).await;
                self.note(warmed)?;
            }
            return Ok((info.name.clone(), compiled));
        }
        let name = fresh_vcl_name(&top.version, true);
        let cli = self.cli().await?;
        let loaded = cli.vcl_inline(&name, &top.text).await;
        self.note(loaded)?;
        Ok((name, compiled + 1))
    }

    /// Compiles the shard and version VCLs of `parts` that `list` does not hold (a VCL is
    /// named after its version, so one that is loaded is the same); returns how many.
    async fn load_parts(&mut self, list: &[VclInfo], parts: &SplitParts) -> Result<usize, Error> {
        let mut compiled = 0;
        for (_, name, text) in parts.vcls() {
            match list.iter().find(|info| info.name == name) {
                Some(info) if info.state == "cold" => {
                    let cli = self.cli().await?;
                    let warmed = cli.vcl_state(&name, VclState::Auto).await;
                    self.note(warmed)?;
                }
                Some(_) => {}
                None => {
                    let cli = self.cli().await?;
                    let loaded = cli.vcl_inline(&name, text).await;
                    match loaded {
                        // Loaded since the list was read (a restore racing a prepare).
                        Err(CliError::Command { ref body, .. })
                            if body.contains("Already a VCL named") => {}
                        other => self.note(other)?,
                    }
                    compiled += 1;
                }
            }
        }
        Ok(compiled)
    }

    /// Points the labels of `labels` at their VCLs (each move is atomic): those missing from
    /// `list`, and with `move_existing` also those pointing elsewhere.
    async fn apply_labels(
        &mut self,
        list: &[VclInfo],
        labels: &[(String, String)],
        move_existing: bool,
    ) -> Result<(), Error> {
        for (label, target) in labels {
            let exists = list.iter().any(|info| info.name == *label);
            if !exists || (move_existing && !points_at(list, label, target)) {
                let cli = self.cli().await?;
                let labelled = cli.vcl_label(label, target).await;
                self.note(labelled)?;
            }
        }
        Ok(())
    }

    /// Activates the VCL of a commit command and starts the child if it is stopped; the
    /// housekeeping ([`Executor::after_commit`]) runs once the answer is sent.
    pub(crate) async fn commit(&mut self, command: &CommitCommand) -> CommitResult {
        let mut result = CommitResult {
            reload_id: command.reload_id.clone(),
            ..Default::default()
        };
        let started = Instant::now();
        let outcome = self.activate_prepared(&command.vcl_name).await;
        result.use_duration = proto_duration(started.elapsed());
        match outcome {
            Ok(version) => {
                result.ok = true;
                result.active_vcl_version = version;
                info!(
                    reload_id = command.reload_id,
                    vcl_name = command.vcl_name,
                    use_ms = duration_ms(&result.use_duration),
                    "committed vcl"
                );
                self.expected = Some(command.vcl_name.clone());
                // Before answering (a quick local write): the agent may stop right after.
                if let Err(error) = self.keep_last_good(&command.vcl_name).await {
                    warn!(error = %error, "cannot keep the committed vcl in the state directory");
                }
            }
            Err(error) => {
                result.error = describe(&error);
                result.transient = may_pass(&error);
                warn!(reload_id = command.reload_id, vcl_name = command.vcl_name, error = %result.error, transient = result.transient, "commit failed");
            }
        }
        result
    }

    /// Activates VCL `name`; for the split VCL prepared under that name, first points its
    /// labels at its shard and version VCLs. Returns the server's version now active.
    async fn activate_prepared(&mut self, name: &str) -> Result<String, Error> {
        let split = self
            .prepared
            .as_ref()
            .filter(|prepared| prepared.name == name)
            .and_then(|prepared| prepared.split.as_ref())
            .map(|parts| (parts.labels(), parts.version().to_owned()));
        let Some((labels, version)) = split else {
            if is_split_top(name) {
                return Err(Error::SplitNotPrepared(name.to_owned()));
            }
            self.activate(name).await?;
            return Ok(version_from_vcl_name(name).unwrap_or_default().to_owned());
        };
        // Labels first: each shard switches on its own, while the active top VCL (this one, or
        // the one before it, which names the same labels) hands requests to it.
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        self.apply_labels(&list, &labels, true).await?;
        self.activate(name).await?;
        Ok(version)
    }

    /// Collects old VCLs; run after the commit's answer was sent, because discarding can take
    /// long on a busy varnishd. A failure is logged: it does not affect what serves.
    pub(crate) async fn after_commit(&mut self) {
        if let Err(error) = self.collect_garbage().await {
            warn!(error = %describe(&error), "vcl garbage collection failed");
        }
    }

    /// Keeps the committed VCL in memory and writes it to the state directory (atomically: a
    /// reader sees the old file or the new one, never half of one).
    async fn keep_last_good(&mut self, vcl_name: &str) -> std::io::Result<()> {
        let Some(prepared) = self.prepared.take() else {
            return Ok(());
        };
        if prepared.name != vcl_name {
            return Ok(());
        }
        let kept = self.last_good.insert(prepared);
        let Some(dir) = &self.config.state_dir else {
            return Ok(());
        };
        tokio::fs::create_dir_all(dir).await?;
        let json = kept_json(kept).to_string();
        // One file, replaced at once: a top VCL is never read back without its parts.
        let partial = dir.join(format!("{LAST_GOOD_JSON}.partial"));
        tokio::fs::write(&partial, json).await?;
        tokio::fs::rename(&partial, dir.join(LAST_GOOD_JSON)).await
    }

    /// Returns the last good VCL: the last one committed by this process, or else the one in
    /// the state directory.
    async fn last_good(&mut self) -> Option<LoadedVcl> {
        if self.last_good.is_none() {
            let dir = self.config.state_dir.as_ref()?;
            if let Ok(json) = tokio::fs::read_to_string(dir.join(LAST_GOOD_JSON)).await {
                // A damaged file restores nothing rather than a top VCL without its parts.
                self.last_good = Some(parse_kept(&json)?);
                return self.last_good.clone();
            }
            // Written by an agent before split VCLs: never split.
            let (Ok(name), Ok(text)) = (
                tokio::fs::read_to_string(dir.join(LAST_GOOD_NAME)).await,
                tokio::fs::read_to_string(dir.join(LAST_GOOD_TEXT)).await,
            ) else {
                return None;
            };
            self.last_good = Some(LoadedVcl {
                name: name.trim().to_owned(),
                text,
                split: None,
            });
        }
        self.last_good.clone()
    }

    /// When varnishd has no active VCL (it restarted with `-f ''`), loads and activates the last
    /// committed one and starts the child.
    pub(crate) async fn restore_last_good(&mut self) -> Result<(), Error> {
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        if self.note(list)?.iter().any(VclInfo::is_active) {
            return Ok(());
        }
        if let Some(name) = self.restore().await? {
            info!(
                vcl_name = name,
                "restored the last good vcl into an empty varnishd"
            );
        }
        Ok(())
    }

    /// Loads the last good VCL (unless it is loaded), activates it and starts the child; returns
    /// its name, or `None` when no VCL was ever committed or kept.
    async fn restore(&mut self) -> Result<Option<String>, Error> {
        let Some(LoadedVcl { name, text, split }) = self.last_good().await else {
            return Ok(None);
        };
        if let Some(parts) = &split {
            let cli = self.cli().await?;
            let list = cli.vcl_list().await;
            let list = self.note(list)?;
            self.load_parts(&list, parts).await?;
            // Nothing is active: every label may point where the top VCL needs it.
            self.apply_labels(&list, &parts.labels(), true).await?;
        }
        let cli = self.cli().await?;
        let loaded = cli.vcl_inline(&name, &text).await;
        match loaded {
            // Loaded but never used (an earlier attempt that did not get to vcl.use).
            Err(CliError::Command { ref body, .. }) if body.contains("Already a VCL named") => {}
            other => self.note(other)?,
        }
        self.activate(&name).await?;
        self.expected = Some(name.clone());
        Ok(Some(name))
    }

    /// Checks with one `vcl.list` (plus `status` when the list cannot tell whether the child
    /// runs) that varnishd serves what the scheduler was last told; repairs what it can: an
    /// empty varnishd gets the last good VCL back and its child started, a stopped child is
    /// started. Returns `None` when healthy (or when the only finding is one already reported
    /// that could not be repaired), and otherwise what was found and done: the scheduler must
    /// then hear what varnishd runs. An error means varnishd cannot be reached.
    pub(crate) async fn check_health(&mut self) -> Result<Option<Repair>, Error> {
        let list = self.fresh_vcl_list().await?;
        let mut verdict = assess(&list, None, self.expected.as_deref());
        if verdict == Verdict::AskChild {
            let cli = self.cli().await?;
            let child = cli.status().await;
            let child = self.note(child)?;
            verdict = assess(&list, Some(&child), self.expected.as_deref());
        }
        let Verdict::Unhealthy(found) = verdict else {
            self.unrepaired = None;
            // Split parts freed since the last collection (their last VCL was discarded while a
            // worker thread still held it, or a prepare was aborted): collected now rather than
            // at the next reload, unless a prepared VCL waits for its commit.
            if self.prepared.is_none()
                && has_unused_split_parts(&list)
                && let Err(error) = self.collect_shards().await
            {
                warn!(error = %describe(&error), "shard vcl collection failed");
            }
            return Ok(None);
        };
        if self.unrepaired.as_ref() == Some(&found) {
            return Ok(None);
        }
        let repaired = match &found {
            Finding::NoActiveVcl { .. } => self.restore().await.map(|restored| match restored {
                Some(name) => format!("restored the last good vcl {name} and started the child"),
                None => "nothing: no vcl was committed or kept here".to_owned(),
            }),
            Finding::ChildStopped => self
                .start_child()
                .await
                .map(|()| "started the child".to_owned()),
            Finding::OtherVcl { .. } => {
                Ok("nothing here: the scheduler brings it up to date".to_owned())
            }
        };
        let done = match repaired {
            Ok(done) => done,
            // varnishd went away during the repair: check again later.
            Err(error) if self.cli.is_none() => return Err(error),
            Err(error) => {
                self.unrepaired = Some(found.clone());
                format!("the repair failed: {}", describe(&error))
            }
        };
        Ok(Some(Repair { found, done }))
    }

    /// Lists the VCLs, on a new connection when the current one fails (after a restart of
    /// varnishd the old connection answers only with an end of file).
    async fn fresh_vcl_list(&mut self) -> Result<Vec<VclInfo>, Error> {
        let had_connection = self.cli.is_some();
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        match self.note(list) {
            Err(error) if had_connection && self.cli.is_none() => {
                debug!(error = %describe(&error), "varnish cli connection lost, reconnecting");
                let cli = self.cli().await?;
                let list = cli.vcl_list().await;
                self.note(list)
            }
            list => list,
        }
    }

    /// Starts the child process.
    async fn start_child(&mut self) -> Result<(), Error> {
        let cli = self.cli().await?;
        let started = cli.start().await;
        self.note(started)
    }

    async fn activate(&mut self, name: &str) -> Result<(), Error> {
        let cli = self.cli().await?;
        let mut used = cli.vcl_use(name).await;
        if let Err(CliError::Command { body, .. }) = &used
            && body.contains("is cold")
        {
            // Garbage collection cooled it after it was prepared: "set to auto or warm first".
            let cli = self.cli().await?;
            let warmed = cli.vcl_state(name, VclState::Auto).await;
            self.note(warmed)?;
            let cli = self.cli().await?;
            used = cli.vcl_use(name).await;
        }
        self.note(used)?;
        let cli = self.cli().await?;
        let state = cli.status().await;
        if self.note(state)? == ChildState::Stopped {
            info!("varnishd child is stopped, starting it");
            let cli = self.cli().await?;
            let started = cli.start().await;
            self.note(started)?;
        }
        Ok(())
    }

    /// Discards the VCL of an abort command; a VCL that does not exist (or is the active one,
    /// after an unchanged prepare) counts as discarded.
    pub(crate) async fn abort(&mut self, command: AbortCommand) -> AbortResult {
        let mut result = AbortResult {
            reload_id: command.reload_id.clone(),
            ..Default::default()
        };
        // What was prepared is not committed: its split parts are collected later.
        self.prepared = None;
        if command.vcl_name.is_empty() {
            result.ok = true;
            return result;
        }
        let discarded = match self.cli().await {
            Ok(cli) => {
                let discarded = cli.vcl_discard(&command.vcl_name).await;
                self.note(discarded)
            }
            Err(error) => Err(error),
        };
        match discarded {
            Ok(()) => result.ok = true,
            Err(Error::Cli(CliError::Command { status, body, .. }))
                if status == CliStatus::Param || status == CliStatus::Cant =>
            {
                debug!(vcl_name = command.vcl_name, %status, body, "nothing to discard");
                result.ok = true;
            }
            Err(error) => result.error = describe(&error),
        }
        info!(
            reload_id = command.reload_id,
            vcl_name = command.vcl_name,
            ok = result.ok,
            "aborted vcl"
        );
        result
    }

    /// Keeps the active VCL and the newest [`KEPT_INACTIVE_VCLS`] other VaaS VCLs (cold), and
    /// discards older VaaS VCLs. VCLs not loaded by VaaS are left alone.
    pub(crate) async fn collect_garbage(&mut self) -> Result<(), Error> {
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        // vcl.list shows VCLs in load order: the newest are last.
        let inactive: Vec<_> = list
            .iter()
            .filter(|info| {
                !info.is_active()
                    && info.status == "available"
                    && info.name.starts_with(VCL_NAME_PREFIX)
            })
            .collect();
        let discard_count = inactive.len().saturating_sub(KEPT_INACTIVE_VCLS);
        for (index, info) in inactive.iter().enumerate() {
            let cli = self.cli().await?;
            let outcome = if index < discard_count {
                cli.vcl_discard(&info.name).await
            } else if info.state != "cold" {
                cli.vcl_state(&info.name, VclState::Cold).await
            } else {
                continue;
            };
            if let Err(error) = self.note(outcome) {
                warn!(vcl_name = info.name, error = %describe(&error), "cannot collect vcl");
            } else if index < discard_count {
                debug!(vcl_name = info.name, "discarded vcl");
            }
        }
        self.collect_shards().await
    }

    /// Discards the split labels no loaded VCL names any more (left from split VCLs that are
    /// gone), then the shard and version VCLs no label points at. A label still named by a
    /// discarded VCL that a worker thread holds waits for a later round.
    async fn collect_shards(&mut self) -> Result<(), Error> {
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        for label in list.iter().filter(|info| is_unused_label(info)) {
            let cli = self.cli().await?;
            let discarded = cli.vcl_discard(&label.name).await;
            if let Err(error) = self.note(discarded) {
                warn!(label = label.name, error = %describe(&error), "cannot discard label");
            }
        }
        let cli = self.cli().await?;
        let list = cli.vcl_list().await;
        let list = self.note(list)?;
        for part in list.iter().filter(|info| is_unused_part(info)) {
            let cli = self.cli().await?;
            let discarded = cli.vcl_discard(&part.name).await;
            if let Err(error) = self.note(discarded) {
                warn!(vcl_name = part.name, error = %describe(&error), "cannot discard vcl");
            }
        }
        Ok(())
    }
}

/// Tells whether `list` holds split labels no VCL names or shard and version VCLs no label
/// points at: something for [`Executor::collect_shards`].
fn has_unused_split_parts(list: &[VclInfo]) -> bool {
    list.iter()
        .any(|info| is_unused_label(info) || is_unused_part(info))
}

/// The JSON kept in the state directory for `kept`.
fn kept_json(kept: &LoadedVcl) -> serde_json::Value {
    let rendered =
        |vcl: &vaas_vcl::RenderedVcl| serde_json::json!({"version": vcl.version, "text": vcl.text});
    let split = kept.split.as_ref().map(|parts| {
        serde_json::json!({
            "shards": parts
                .shards
                .iter()
                .map(|(index, shard)| serde_json::json!({"index": index, "vcl": rendered(shard)}))
                .collect::<Vec<_>>(),
            "version_vcl": rendered(&parts.version_vcl),
        })
    });
    serde_json::json!({"name": kept.name, "text": kept.text, "split": split})
}

/// Reads what [`kept_json`] wrote; `None` when it is damaged.
fn parse_kept(json: &str) -> Option<LoadedVcl> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let rendered = |value: &serde_json::Value| {
        Some(vaas_vcl::RenderedVcl {
            version: value.get("version")?.as_str()?.to_owned(),
            text: value.get("text")?.as_str()?.to_owned(),
        })
    };
    let split = match value.get("split") {
        None | Some(serde_json::Value::Null) => None,
        Some(split) => Some(SplitParts {
            shards: split
                .get("shards")?
                .as_array()?
                .iter()
                .map(|shard| {
                    let index = usize::try_from(shard.get("index")?.as_u64()?).ok()?;
                    Some((index, rendered(shard.get("vcl")?)?))
                })
                .collect::<Option<_>>()?,
            version_vcl: rendered(split.get("version_vcl")?)?,
        }),
    };
    Some(LoadedVcl {
        name: value.get("name")?.as_str()?.to_owned(),
        text: value.get("text")?.as_str()?.to_owned(),
        split,
    })
}

/// Describes an error for a result message: the compiler's message for a compile error, the
/// error and its sources otherwise.
fn describe(error: &Error) -> String {
    if let Error::Cli(CliError::Command { body, .. }) = error {
        return body.trim_end().to_owned();
    }
    vaas_runtime::error_chain(error)
}

/// Tells whether a failure talking to varnishd may pass by itself: it could not be reached,
/// the connection broke (varnishd restarting) or it answered too late. An answer of varnishd's
/// (a compile error, a refused command) or a bad secret would come again.
fn may_pass(error: &Error) -> bool {
    matches!(
        error,
        Error::SplitNotPrepared(_)
            | Error::Cli(
                CliError::Connect { .. }
                    | CliError::Io(_)
                    | CliError::Timeout { .. }
                    | CliError::Protocol(_)
                    | CliError::Broken
            )
    )
}

fn proto_duration(duration: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(duration).ok()
}

fn duration_ms(duration: &Option<prost_types::Duration>) -> i64 {
    duration.as_ref().map_or(0, |d| {
        d.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(d.nanos / 1_000_000))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_varnishd_is_unsafe_when_a_hardening_parameter_is_on_or_writable() {
        let param =
            |value: serde_json::Value, protected: bool| super::ParamInfo { value, protected };
        let hardened = [
            ("vcc_unsafe_path", param(false.into(), true)),
            ("vcc_allow_inline_c", param(false.into(), true)),
            ("vmod_path", param("/usr/lib/varnish/vmods".into(), true)),
            ("vcl_path", param("/etc/varnish".into(), true)),
            ("cc_command", param("exec gcc …".into(), true)),
        ];
        assert_eq!(super::unsafe_settings(&hardened), Vec::<String>::new());
        let stock = [
            ("vcc_unsafe_path", param(true.into(), false)),
            ("vcc_allow_inline_c", param(false.into(), false)),
        ];
        assert_eq!(
            super::unsafe_settings(&stock),
            [
                "vcc_unsafe_path is on",
                "vcc_unsafe_path is not read-only (start varnishd with -r vcc_unsafe_path)",
                "vcc_allow_inline_c is not read-only (start varnishd with -r vcc_allow_inline_c)",
            ]
        );
    }

    use super::*;

    #[test]
    fn versions_are_read_from_vcl_names() {
        assert_eq!(
            version_from_vcl_name("vaas-0123456789abcdef-1700000000000-3"),
            Some("0123456789abcdef")
        );
        assert_eq!(
            version_from_vcl_name("vaas-0123456789abcdef"),
            Some("0123456789abcdef")
        );
        assert_eq!(version_from_vcl_name("boot"), None);
        assert_eq!(version_from_vcl_name("vaas-0123"), None);
        assert_eq!(version_from_vcl_name("vaas-0123456789abcdefg"), None);
        assert_eq!(version_from_vcl_name("vaas-xyz3456789abcdef-1"), None);
    }

    fn vcl(name: &str, status: &str, busy: Option<u64>) -> VclInfo {
        VclInfo {
            status: status.into(),
            state: "auto".into(),
            temperature: "warm".into(),
            busy,
            name: name.into(),
            label: None,
            labels: 0,
        }
    }

    #[test]
    fn a_varnishd_running_the_expected_vcl_is_healthy_from_vcl_list_alone() {
        let list = [
            vcl("vaas-old", "available", Some(0)),
            vcl("vaas-new", "active", Some(3)),
        ];
        assert_eq!(assess(&list, None, Some("vaas-new")), Verdict::Healthy);
    }

    #[test]
    fn nothing_is_expected_of_a_varnishd_that_never_ran_a_vcl() {
        assert_eq!(assess(&[], None, None), Verdict::Healthy);
        let stopped = [vcl("boot", "active", None)];
        assert_eq!(assess(&stopped, None, None), Verdict::Healthy);
    }

    #[test]
    fn a_restarted_empty_varnishd_needs_the_last_good_vcl() {
        let expected = Some("vaas-0123456789abcdef-1-0");
        let found = Verdict::Unhealthy(Finding::NoActiveVcl {
            expected: "vaas-0123456789abcdef-1-0".into(),
        });
        assert_eq!(assess(&[], None, expected), found);
        // A VCL loaded but not used (an interrupted restore) serves nothing either.
        let loaded = [vcl("vaas-0123456789abcdef-1-0", "available", None)];
        assert_eq!(assess(&loaded, None, expected), found);
    }

    #[test]
    fn another_active_vcl_is_reported() {
        let list = [vcl("boot", "active", Some(0))];
        assert_eq!(
            assess(&list, None, Some("vaas-new")),
            Verdict::Unhealthy(Finding::OtherVcl {
                active: "boot".into(),
                expected: "vaas-new".into(),
            })
        );
    }

    #[test]
    fn without_a_busy_count_the_child_state_decides() {
        let list = [vcl("vaas-new", "active", None)];
        let expected = Some("vaas-new");
        assert_eq!(assess(&list, None, expected), Verdict::AskChild);
        assert_eq!(
            assess(&list, Some(&ChildState::Stopped), expected),
            Verdict::Unhealthy(Finding::ChildStopped)
        );
        assert_eq!(
            assess(&list, Some(&ChildState::Running), expected),
            Verdict::Healthy
        );
        // On its way up: checked again later, not started twice.
        let starting = ChildState::Other("starting".into());
        assert_eq!(assess(&list, Some(&starting), expected), Verdict::Healthy);
    }

    #[test]
    fn findings_say_what_was_found() {
        let found = Finding::OtherVcl {
            active: "boot".into(),
            expected: "vaas-new".into(),
        };
        assert_eq!(found.to_string(), "vcl boot is active instead of vaas-new");
    }

    fn rendered(version: &str) -> vaas_vcl::RenderedVcl {
        vaas_vcl::RenderedVcl {
            version: version.into(),
            text: format!("vcl 4.1; # {version}"),
        }
    }

    #[test]
    fn a_kept_split_vcl_is_read_back_whole_and_a_damaged_one_not_at_all() {
        let kept = LoadedVcl {
            name: "vaas-0123456789abcdef-split-1-0".into(),
            text: "vcl 4.1; # top".into(),
            split: Some(SplitParts {
                shards: vec![(3, rendered("aaaa")), (7, rendered("bbbb"))],
                version_vcl: rendered("cccc"),
            }),
        };
        let json = kept_json(&kept).to_string();
        let read = parse_kept(&json).expect("reads back");
        assert_eq!(
            (read.name.as_str(), read.text.as_str()),
            ("vaas-0123456789abcdef-split-1-0", "vcl 4.1; # top")
        );
        let parts = read.split.expect("split parts");
        assert_eq!(
            parts.labels(),
            [
                ("vaas_shard_3".to_owned(), "vaasd-aaaa".to_owned()),
                ("vaas_shard_7".to_owned(), "vaasd-bbbb".to_owned()),
                ("vaas_version".to_owned(), "vaasv-cccc".to_owned()),
            ]
        );
        assert_eq!(parts.shards[1].1, rendered("bbbb"));
        assert!(parse_kept(&json[..json.len() / 2]).is_none());
        let single = LoadedVcl {
            split: None,
            ..kept
        };
        assert!(
            parse_kept(&kept_json(&single).to_string())
                .expect("reads")
                .split
                .is_none()
        );
    }

    #[test]
    fn a_split_server_runs_the_version_its_version_label_points_at() {
        let mut label = vcl(vaas_vcl::VERSION_LABEL, "available", Some(0));
        label.label = Some(crate::varnish_cli::LabelTarget {
            name: "vaasv-fedcba9876543210".into(),
            refs: 1,
        });
        let list = [
            label,
            vcl("vaas-0123456789abcdef-split-1-0", "active", Some(0)),
        ];
        assert_eq!(
            running_version(&list, "vaas-0123456789abcdef-split-1-0"),
            "fedcba9876543210"
        );
        assert_eq!(
            running_version(&list, "vaas-0123456789abcdef-1-0"),
            "0123456789abcdef"
        );
        assert!(!has_unused_split_parts(&list));
        let mut unused = list[0].clone();
        unused.label = Some(crate::varnish_cli::LabelTarget {
            name: "vaasv-fedcba9876543210".into(),
            refs: 0,
        });
        assert!(has_unused_split_parts(&[unused]));
        assert!(has_unused_split_parts(&[vcl(
            "vaasd-aaaa",
            "available",
            Some(0)
        )]));
    }

    #[test]
    fn fresh_names_are_valid_unique_and_carry_the_version() {
        let first = fresh_vcl_name("0123456789abcdef", false);
        let second = fresh_vcl_name("0123456789abcdef", true);
        assert!(!is_split_top(&first) && is_split_top(&second));
        assert_ne!(first, second);
        assert!(crate::varnish_cli::check_vcl_name(&first).is_ok());
        assert_eq!(version_from_vcl_name(&first), Some("0123456789abcdef"));
    }
}
