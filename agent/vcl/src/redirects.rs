//! Redirects and the domain mappings they apply to: which hosts a mapping stands for in a
//! cluster, which redirect answers a request and with which Location, the same way the rendered
//! `vcl_recv` does, and the check of every redirect's assertions.
//!
//! Order: domain groups with exact hosts (static and dynamic mappings) before those with
//! expressions (static_regex), then by mapping id; within a group, redirects by priority, then
//! id. Hosts are compared lower-cased (`std.tolower(req.http.host)`).

use vaas_proto::v1::{ClusterSnapshot, DomainMapping, DomainMappingType, Redirect};

use crate::RenderError;
use crate::routing::{Compile, MAX_CONDITION_VALUE, MAX_HEADER_NAME, Pattern, Request};

/// Request header that carries a redirect's Location from `vcl_recv` to `vcl_synth`.
pub(crate) const LOCATION_HEADER: &str = "X-VaaS-Location";

/// The synthetic reason `vcl_recv` answers a redirect with; `vcl_synth` turns it into a Location.
pub(crate) const REDIRECT_REASON: &str = "vaas_redirect";

/// The synthetic reason of a redirect to HTTPS (a plain-HTTP request for an HTTPS-only director).
pub(crate) const HTTPS_REASON: &str = "vaas_https";

/// Most characters of a mapped host, a host template or a host expression.
pub const MAX_HOST: usize = 253;

/// Longest destination or Location, in bytes.
pub const MAX_LOCATION: usize = 2048;

/// The statuses a redirect may answer with.
pub const REDIRECT_STATUSES: [u32; 4] = [301, 302, 307, 308];

/// What answers a request with a redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectDecision {
    /// The redirect; `None` for the redirect of a plain-HTTP request to HTTPS.
    pub redirect_id: Option<i64>,
    /// The status, 301, 302, 307 or 308.
    pub status: u32,
    /// The Location header.
    pub location: String,
}

/// How a domain group recognises its hosts.
#[derive(Debug, Clone)]
pub(crate) enum Hosts {
    /// Lower-case host names, compared exactly.
    Exact(Vec<String>),
    /// Expressions matched against the lower-cased Host header.
    Patterns(Vec<(String, Pattern)>),
}

impl Hosts {
    fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match self {
            Hosts::Exact(names) => names.contains(&host),
            Hosts::Patterns(patterns) => patterns.iter().any(|(_, pattern)| pattern.matches(&host)),
        }
    }
}

/// One validated redirect.
#[derive(Debug, Clone)]
pub(crate) struct RedirectRule {
    pub(crate) id: i64,
    pub(crate) status: u32,
    pub(crate) condition: String,
    pattern: Pattern,
    pub(crate) rewrite_groups: bool,
    pub(crate) destination: String,
    pub(crate) preserve_query: bool,
    /// (name, value); an empty value requires only that the header is present.
    pub(crate) required_header: Option<(String, String)>,
}

impl RedirectRule {
    /// The Location this redirect answers `request` with, if it applies to it.
    fn answer(&self, request: &Request) -> Option<String> {
        if let Some((name, value)) = &self.required_header {
            match request.header(name) {
                Some(found) if value.is_empty() || found == value => {}
                _ => return None,
            }
        }
        let captures = self.pattern.captures(&request.url)?;
        let mut location = if self.rewrite_groups {
            substitute_groups(&self.destination, &captures)
        } else {
            self.destination.clone()
        };
        if self.preserve_query
            && let Some((_, query)) = request.url.split_once('?')
        {
            location.push(self.query_separator());
            location.push_str(query);
        }
        Some(location)
    }

    /// What joins the destination and a preserved query string.
    pub(crate) fn query_separator(&self) -> char {
        if self.destination.contains('?') {
            '&'
        } else {
            '?'
        }
    }
}

/// Replaces `\1`..`\9` in `destination` by the groups of a match, as varnishd's `regsub` does
/// (an unset group is empty).
fn substitute_groups(destination: &str, captures: &[Option<String>]) -> String {
    let mut out = String::with_capacity(destination.len());
    let mut chars = destination.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(digit @ '0'..='9') => {
                let group = digit as usize - '0' as usize;
                if let Some(Some(text)) = captures.get(group) {
                    out.push_str(text);
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The redirects of one domain mapping, with the hosts it stands for in the cluster.
#[derive(Debug, Clone)]
pub(crate) struct DomainGroup {
    pub(crate) mapping_id: i64,
    pub(crate) domain: String,
    pub(crate) hosts: Hosts,
    pub(crate) redirects: Vec<RedirectRule>,
}

/// The redirects of a cluster, grouped by domain, in the order `vcl_recv` tries them.
#[derive(Debug, Clone, Default)]
pub(crate) struct RedirectTable {
    pub(crate) groups: Vec<DomainGroup>,
}

impl RedirectTable {
    /// Builds the table; mappings without redirects, and dynamic mappings none of whose entries
    /// the cluster's labels fill, are left out.
    pub(crate) fn build(snapshot: &ClusterSnapshot) -> Result<RedirectTable, RenderError> {
        let labels: Vec<(&str, &str)> = snapshot
            .cluster
            .iter()
            .flat_map(|cluster| cluster.labels.iter())
            .filter_map(|label| label.split_once(':'))
            .collect();
        let mut mappings: Vec<&DomainMapping> = snapshot.domain_mappings.iter().collect();
        mappings.sort_by_key(|mapping| (is_regex(mapping), mapping.id));
        let mut groups = Vec::new();
        for mapping in mappings {
            let mut redirects: Vec<&Redirect> = snapshot
                .redirects
                .iter()
                .filter(|redirect| redirect.source_domain_id == mapping.id)
                .collect();
            if redirects.is_empty() {
                continue;
            }
            let Some(hosts) = mapped_hosts(mapping, &labels)? else {
                continue;
            };
            redirects.sort_by_key(|redirect| (redirect.priority, redirect.id));
            let redirects = redirects
                .into_iter()
                .map(redirect_rule)
                .collect::<Result<Vec<_>, _>>()?;
            groups.push(DomainGroup {
                mapping_id: mapping.id,
                domain: mapping.domain.clone(),
                hosts,
                redirects,
            });
        }
        Ok(RedirectTable { groups })
    }

    /// Returns the redirect that answers `request`, if one does.
    pub(crate) fn decide(&self, request: &Request) -> Option<RedirectDecision> {
        self.groups
            .iter()
            .filter(|group| group.hosts.matches(&request.host))
            .flat_map(|group| group.redirects.iter())
            .find_map(|redirect| {
                redirect.answer(request).map(|location| RedirectDecision {
                    redirect_id: Some(redirect.id),
                    status: redirect.status,
                    location,
                })
            })
    }
}

fn is_regex(mapping: &DomainMapping) -> bool {
    mapping.r#type() == DomainMappingType::StaticRegex
}

/// Checks a static host name, or a template once filled: letters, digits, "-", "." and "_",
/// with an optional ":port".
pub fn is_host(host: &str) -> bool {
    let (name, port) = host.split_once(':').unwrap_or((host, "80"));
    !name.is_empty()
        && host.len() <= MAX_HOST
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && port.parse::<u16>().is_ok_and(|port| port > 0)
}

/// Checks one mapping of a domain mapping of `kind` as the API accepts it; the error says what
/// is wrong.
pub fn check_mapping(kind: DomainMappingType, mapping: &str) -> Result<(), String> {
    check_mapping_compiled(kind, mapping, Compile::Now)
}

fn check_mapping_compiled(
    kind: DomainMappingType,
    mapping: &str,
    compile: Compile,
) -> Result<(), String> {
    if mapping.chars().count() > MAX_HOST {
        return Err(format!("must be at most {MAX_HOST} characters"));
    }
    match kind {
        DomainMappingType::StaticRegex => {
            if mapping.chars().any(char::is_control) || mapping.contains("\"}") {
                return Err("must not contain control characters or the sequence \"}".into());
            }
            Pattern::compiled(mapping, compile).map(|_| ())
        }
        DomainMappingType::Dynamic => {
            let filled = fill_placeholders(mapping, |_| Some("x"))?;
            if is_host(&filled) {
                Ok(())
            } else {
                Err("must be a host name with {label} placeholders".into())
            }
        }
        _ => {
            if is_host(mapping) {
                Ok(())
            } else {
                Err("must be a host name (letters, digits, \"-\", \".\", \"_\"), with an optional :port".into())
            }
        }
    }
}

/// Fills `{key}` placeholders with `value_of(key)`; `Ok(text)` with every placeholder filled,
/// an error for a malformed one, and `Err` naming the key when a value is missing.
fn fill_placeholders<'a>(
    template: &str,
    value_of: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after.find('}').ok_or("has a \"{\" without its \"}\"")?;
        let key = &after[..end];
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("has an invalid placeholder {{{key}}}"));
        }
        out.push_str(value_of(key).ok_or_else(|| format!("needs the label {key}"))?);
        rest = &after[end + 1..];
    }
    if rest.contains('}') {
        return Err("has a \"}\" without its \"{\"".into());
    }
    out.push_str(rest);
    Ok(out)
}

/// Returns the hosts `mapping` stands for in a cluster with `labels`; `None` when it stands for
/// none there (a dynamic mapping whose labels the cluster lacks).
fn mapped_hosts(
    mapping: &DomainMapping,
    labels: &[(&str, &str)],
) -> Result<Option<Hosts>, RenderError> {
    let invalid = |reason: String| RenderError::InvalidDomainMapping {
        mapping_id: mapping.id,
        reason,
    };
    let entries: Vec<&str> = if mapping.mappings.is_empty() {
        vec![mapping.domain.as_str()]
    } else {
        mapping.mappings.iter().map(String::as_str).collect()
    };
    let kind = mapping.r#type();
    for entry in &entries {
        check_mapping_compiled(kind, entry, Compile::OnFirstUse)
            .map_err(|reason| invalid(format!("mapping {entry:?} {reason}")))?;
    }
    let hosts = match kind {
        DomainMappingType::StaticRegex => Hosts::Patterns(
            entries
                .iter()
                .map(|entry| {
                    let pattern =
                        Pattern::compiled(entry, Compile::OnFirstUse).map_err(&invalid)?;
                    Ok(((*entry).to_owned(), pattern))
                })
                .collect::<Result<Vec<_>, RenderError>>()?,
        ),
        DomainMappingType::Dynamic => {
            let value_of = |key: &str| {
                labels
                    .iter()
                    .find(|(label, _)| *label == key)
                    .map(|(_, value)| *value)
            };
            // An entry whose labels the cluster lacks, or whose filled value is no host name,
            // stands for nothing in this cluster.
            let names: Vec<String> = entries
                .iter()
                .filter_map(|entry| fill_placeholders(entry, value_of).ok())
                .map(|host| host.to_ascii_lowercase())
                .filter(|host| is_host(host))
                .collect();
            if names.is_empty() {
                return Ok(None);
            }
            Hosts::Exact(names)
        }
        _ => Hosts::Exact(
            entries
                .iter()
                .map(|entry| entry.to_ascii_lowercase())
                .collect(),
        ),
    };
    Ok(Some(hosts))
}

/// Checks a redirect's condition, destination and header as the renderer writes them.
pub fn check_redirect(redirect: &Redirect) -> Result<(), (&'static str, String)> {
    checked_condition(redirect, Compile::Now).map(|_| ())
}

/// Checks a redirect as [`check_redirect`] does and returns its condition's pattern.
fn checked_condition(
    redirect: &Redirect,
    compile: Compile,
) -> Result<Pattern, (&'static str, String)> {
    let long_string_safe =
        |text: &str| !text.chars().any(char::is_control) && !text.contains("\"}");
    if redirect.condition.is_empty() || redirect.condition.chars().count() > MAX_CONDITION_VALUE {
        return Err((
            "condition",
            format!("must be 1 to {MAX_CONDITION_VALUE} characters"),
        ));
    }
    if !long_string_safe(&redirect.condition) {
        return Err((
            "condition",
            "must not contain control characters or the sequence \"}".into(),
        ));
    }
    let pattern =
        Pattern::compiled(&redirect.condition, compile).map_err(|reason| ("condition", reason))?;
    let destination = &redirect.destination;
    let absolute = Request::from_absolute_url(destination).is_ok();
    let printable = destination
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && (redirect.rewrite_groups || b != b'\\'));
    if destination.len() > MAX_LOCATION || !(absolute || destination.starts_with('/')) || !printable
    {
        return Err((
            "destination",
            format!(
                "must be an absolute http(s) URL or a path starting with \"/\": at most \
                 {MAX_LOCATION} printable ASCII characters without spaces or quotes"
            ),
        ));
    }
    if redirect.rewrite_groups {
        let bytes = destination.as_bytes();
        let bad_escape = bytes
            .iter()
            .enumerate()
            .any(|(index, b)| *b == b'\\' && !matches!(bytes.get(index + 1), Some(b'1'..=b'9')));
        if bad_escape {
            return Err((
                "destination",
                "may use a backslash only before a group number from 1 to 9".into(),
            ));
        }
    }
    if !REDIRECT_STATUSES.contains(&redirect.status) {
        return Err(("status", "must be 301, 302, 307 or 308".into()));
    }
    if let Some(header) = &redirect.required_header {
        let name_ok = !header.name.is_empty()
            && header.name.len() <= MAX_HEADER_NAME
            && header
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !name_ok {
            return Err((
                "required_header.name",
                format!("must be 1 to {MAX_HEADER_NAME} ASCII letters, digits or \"-\""),
            ));
        }
        if header.value.chars().count() > MAX_CONDITION_VALUE || !long_string_safe(&header.value) {
            return Err((
                "required_header.value",
                format!(
                    "must be at most {MAX_CONDITION_VALUE} characters, without control \
                     characters or the sequence \"}}"
                ),
            ));
        }
    }
    Ok(pattern)
}

fn redirect_rule(redirect: &Redirect) -> Result<RedirectRule, RenderError> {
    let pattern = checked_condition(redirect, Compile::OnFirstUse).map_err(|(field, reason)| {
        RenderError::InvalidRedirect {
            redirect_id: redirect.id,
            reason: format!("{field} {reason}"),
        }
    })?;
    Ok(RedirectRule {
        id: redirect.id,
        status: redirect.status,
        condition: redirect.condition.clone(),
        pattern,
        rewrite_groups: redirect.rewrite_groups,
        destination: redirect.destination.clone(),
        preserve_query: redirect.preserve_query,
        required_header: redirect
            .required_header
            .as_ref()
            .map(|header| (header.name.clone(), header.value.clone())),
    })
}
