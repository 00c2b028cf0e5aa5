//! Where a request goes: the decision the rendered `ROUTER` makes, computed in Rust from the same
//! snapshot, so that the API can check route positive URLs before a change is saved and explain
//! a request without asking a Varnish server.
//!
//! The order is the VCL's: routes by priority (then id), the first whose conditions all hold;
//! else the first non-virtual director whose route expression matches the Host header (domain
//! routers) or the URL (path routers), domain routers first, then by id; else nothing (a
//! synthetic 404). Regular expressions use PCRE2, varnishd's engine.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::OnceLock;

use vaas_proto::v1::{
    ClusterSnapshot, Director, DirectorProtocol, DirectorRouter, Route, RouteAction, RouteLeft,
    RouteOperator,
};

use crate::RenderError;
use crate::model::check_route_expression;
use crate::redirects::{RedirectDecision, RedirectTable};

/// Header set from `std.random(0, 100)` once per request when a route compares the canary random
/// number; a value a client sends is overwritten, and it is removed before the request leaves.
pub(crate) const CANARY_HEADER: &str = "X-VaaS-Canary-Random";

/// Most characters of a header name in a route condition.
pub const MAX_HEADER_NAME: usize = 64;

/// Most characters of a condition value.
pub const MAX_CONDITION_VALUE: usize = 512;

/// The largest canary random number (exclusive): `std.random(0, 100)` is below it.
pub const CANARY_RANGE: u32 = 100;

/// Checks one route condition as the renderer will write it; the error starts with the field
/// (relative to the condition), then says what is wrong: "value must not contain control
/// characters".
pub fn check_condition(condition: &vaas_proto::v1::RouteCondition) -> Result<(), String> {
    ConditionRule::new(condition, Compile::Now).map(|_| ())
}

/// A request as the router sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Path and query, as `req.url`.
    pub url: String,
    /// The Host header, as `req.http.host`.
    pub host: String,
    /// Other headers, name and value (names compared regardless of case).
    pub headers: Vec<(String, String)>,
    /// The canary random number the request drew, from 0 to 99.
    pub canary_random: u32,
}

impl Request {
    /// The request a client sends for the absolute `url` (`http://host[:port]/path?query`): the
    /// Host header is the authority as written, the URL the path (at least "/") and query, the
    /// fragment dropped; an https URL arrives with `X-Forwarded-Proto: https`, as from the TLS
    /// terminator in front of varnishd.
    pub fn from_absolute_url(url: &str) -> Result<Request, String> {
        let url_is_https = url.starts_with("https://");
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or("must start with http:// or https://")?;
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (host, path) = rest.split_at(end);
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
        if !host_ok {
            return Err("must name a host (letters, digits, \"-\", \".\", \"_\", a port)".into());
        }
        if path.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces (percent-encode the rest)".into());
        }
        let url = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        // What a TLS terminator in front of varnishd tells it about an https request.
        let headers = if url_is_https {
            vec![(FORWARDED_PROTO_HEADER.to_owned(), "https".to_owned())]
        } else {
            Vec::new()
        };
        Ok(Request {
            url,
            host: host.to_owned(),
            headers,
            canary_random: 0,
        })
    }

    /// The value of header `name` (compared regardless of case); the Host header included.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        if name.eq_ignore_ascii_case("host") {
            return Some(&self.host);
        }
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// What the router picks for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The route that matched, if one did.
    pub route_id: Option<i64>,
    /// What the route does with the request (pass or pipe); `None` without a route (the request
    /// goes on through `vcl_hash`, and may be a cache hit).
    pub action: Option<RouteAction>,
    /// The director chosen, by a route or by its route expression; `None`: a synthetic 404.
    pub director_id: Option<i64>,
    /// Its name.
    pub director: Option<String>,
    /// Set when varnishd answers with a redirect instead (a redirect of the request's domain,
    /// or the redirect of a plain-HTTP request for an HTTPS-only director to HTTPS).
    pub redirect: Option<RedirectDecision>,
}

/// When a pattern is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compile {
    /// Now, refusing an invalid expression: the API's checks before anything is saved.
    Now,
    /// On first use: rendering writes expressions without matching them (compiling the
    /// thousands of a large cluster would cost more than the rest of the render), and the API
    /// checked them with this same engine when they were saved.
    OnFirstUse,
}

/// A PCRE2 expression, the engine varnishd uses.
#[derive(Clone)]
pub(crate) struct Pattern {
    expression: String,
    /// `None` inside for an expression PCRE2 refuses: it matches nothing.
    compiled: OnceLock<Option<pcre2::bytes::Regex>>,
}

impl Pattern {
    /// Returns the pattern of `expression`, compiled as `when` says.
    pub(crate) fn compiled(expression: &str, when: Compile) -> Result<Pattern, String> {
        let pattern = Pattern {
            expression: expression.to_owned(),
            compiled: OnceLock::new(),
        };
        if when == Compile::Now {
            let regex = pcre2::bytes::Regex::new(expression)
                .map_err(|error| format!("is not a valid regular expression: {error}"))?;
            let _ = pattern.compiled.set(Some(regex));
        }
        Ok(pattern)
    }

    fn regex(&self) -> Option<&pcre2::bytes::Regex> {
        self.compiled
            .get_or_init(|| pcre2::bytes::Regex::new(&self.expression).ok())
            .as_ref()
    }

    pub(crate) fn matches(&self, subject: &str) -> bool {
        // A match that fails at run time (PCRE2's match limit) is no match, as in varnishd.
        self.regex()
            .is_some_and(|regex| regex.is_match(subject.as_bytes()).unwrap_or(false))
    }

    /// The groups of the first match (0 the whole match), `None` without a match.
    pub(crate) fn captures(&self, subject: &str) -> Option<Vec<Option<String>>> {
        let captures = self.regex()?.captures(subject.as_bytes()).ok().flatten()?;
        Some(
            (0..captures.len())
                .map(|index| {
                    captures
                        .get(index)
                        .map(|group| String::from_utf8_lossy(group.as_bytes()).into_owned())
                })
                .collect(),
        )
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Pattern({:?})", self.expression)
    }
}

/// What a condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Left {
    Url,
    Host,
    /// A header, by its validated name.
    Header(String),
    CanaryRandom,
}

/// One validated condition.
#[derive(Debug, Clone)]
pub(crate) struct ConditionRule {
    pub(crate) left: Left,
    pub(crate) operator: RouteOperator,
    /// The value as written (a text, a regular expression or a number).
    pub(crate) value: String,
    pattern: Option<Pattern>,
    number: u32,
}

impl ConditionRule {
    /// Checks one condition as the API accepts it; the error names what is wrong.
    pub(crate) fn new(
        condition: &vaas_proto::v1::RouteCondition,
        compile: Compile,
    ) -> Result<ConditionRule, String> {
        let operator = RouteOperator::try_from(condition.operator)
            .ok()
            .filter(|operator| *operator != RouteOperator::Unspecified)
            .ok_or("operator is not a known value")?;
        let left = match RouteLeft::try_from(condition.left) {
            Ok(RouteLeft::Url) => Left::Url,
            Ok(RouteLeft::Host) => Left::Host,
            Ok(RouteLeft::Header) => {
                let name = &condition.header;
                let well_formed = !name.is_empty()
                    && name.len() <= MAX_HEADER_NAME
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !well_formed {
                    return Err(format!(
                        "header must be 1 to {MAX_HEADER_NAME} ASCII letters, digits or \"-\""
                    ));
                }
                Left::Header(name.clone())
            }
            Ok(RouteLeft::CanaryRandom) => Left::CanaryRandom,
            _ => return Err("left is not a known value".into()),
        };
        if left != Left::Header(condition.header.clone()) && !condition.header.is_empty() {
            return Err("header must be empty unless left is ROUTE_LEFT_HEADER".into());
        }
        let value = &condition.value;
        if value.chars().count() > MAX_CONDITION_VALUE {
            return Err(format!(
                "value must be at most {MAX_CONDITION_VALUE} characters"
            ));
        }
        if value.chars().any(char::is_control) {
            return Err("value must not contain control characters".into());
        }
        if value.contains("\"}") {
            return Err("value must not contain the sequence \"}".into());
        }
        let mut rule = ConditionRule {
            left,
            operator,
            value: value.clone(),
            pattern: None,
            number: 0,
        };
        let regex = matches!(operator, RouteOperator::Matches | RouteOperator::NotMatches);
        let ordered = matches!(operator, RouteOperator::Less | RouteOperator::Greater);
        if rule.left == Left::CanaryRandom {
            if regex {
                return Err("operator must be ==, !=, < or > for the canary random number".into());
            }
            rule.number = value
                .parse::<u32>()
                .ok()
                .filter(|number| *number <= CANARY_RANGE)
                .ok_or("value must be an integer from 0 to 100 for the canary random number")?;
        } else if ordered {
            return Err("operator < and > compare only the canary random number".into());
        } else if regex {
            rule.pattern = Some(
                Pattern::compiled(value, compile).map_err(|reason| format!("value {reason}"))?,
            );
        }
        Ok(rule)
    }

    fn holds(&self, request: &Request) -> bool {
        if self.left == Left::CanaryRandom {
            let ordering = request.canary_random.cmp(&self.number);
            return match self.operator {
                RouteOperator::Equal => ordering == Ordering::Equal,
                RouteOperator::NotEqual => ordering != Ordering::Equal,
                RouteOperator::Less => ordering == Ordering::Less,
                RouteOperator::Greater => ordering == Ordering::Greater,
                _ => false,
            };
        }
        // An absent header compares like an empty string in VCL for == and ~ (it is "not set":
        // == "" is false and != "" true, and no expression matches it).
        let subject = match &self.left {
            Left::Url => Some(request.url.as_str()),
            Left::Host => Some(request.host.as_str()),
            Left::Header(name) => request.header(name),
            Left::CanaryRandom => None,
        };
        match (self.operator, subject) {
            (RouteOperator::Equal, Some(subject)) => subject == self.value,
            (RouteOperator::NotEqual, Some(subject)) => subject != self.value,
            (RouteOperator::NotEqual, None) => true,
            (RouteOperator::Matches, Some(subject)) => self.matches(subject),
            (RouteOperator::NotMatches, Some(subject)) => !self.matches(subject),
            (RouteOperator::NotMatches, None) => true,
            _ => false,
        }
    }

    fn matches(&self, subject: &str) -> bool {
        self.pattern
            .as_ref()
            .is_some_and(|pattern| pattern.matches(subject))
    }
}

/// One route as the router tries it.
#[derive(Debug, Clone)]
pub(crate) struct RouteRule {
    pub(crate) id: i64,
    pub(crate) director_id: i64,
    pub(crate) director: String,
    pub(crate) action: RouteAction,
    pub(crate) conditions: Vec<ConditionRule>,
}

impl RouteRule {
    fn holds(&self, request: &Request) -> bool {
        self.conditions
            .iter()
            .all(|condition| condition.holds(request))
    }

    /// Tells whether the route compares the canary random number.
    pub(crate) fn uses_canary_random(&self) -> bool {
        self.conditions
            .iter()
            .any(|condition| condition.left == Left::CanaryRandom)
    }
}

/// One routed director as the router tries it.
#[derive(Debug, Clone)]
struct DirectorRule {
    id: i64,
    name: String,
    by_path: bool,
    pattern: Pattern,
    /// Plain-HTTP requests are redirected to HTTPS.
    https_only: bool,
}

/// Tells whether a director serves HTTPS only: its plain-HTTP requests (those without
/// `X-Forwarded-Proto: https` from the TLS terminator in front of varnishd) are redirected.
pub(crate) fn is_https_only(director: &Director) -> bool {
    director.protocol() == DirectorProtocol::Https
}

/// Request header a TLS terminator in front of varnishd sets to "https".
pub(crate) const FORWARDED_PROTO_HEADER: &str = "X-Forwarded-Proto";

/// The routes and routed directors of a cluster, in the order the router tries them.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub(crate) redirects: RedirectTable,
    pub(crate) routes: Vec<RouteRule>,
    directors: Vec<DirectorRule>,
}

/// Returns the enabled directors of the snapshot in routing order: domain routers before path
/// routers, then by id. Virtual ones are included (they are declared, never routed).
pub(crate) fn director_order(snapshot: &ClusterSnapshot) -> Vec<&Director> {
    let mut directors: Vec<&Director> = snapshot
        .directors
        .iter()
        .filter(|director| director.enabled.unwrap_or(true))
        .collect();
    directors.sort_by_key(|director| {
        let by_path = director.router() != DirectorRouter::Domain;
        (by_path, director.id)
    });
    directors
}

impl RoutingTable {
    /// Builds the table of a snapshot; routes whose director is not routed here (disabled,
    /// virtual or not served by the cluster) are left out, as the VCL leaves them out.
    pub fn build(snapshot: &ClusterSnapshot) -> Result<RoutingTable, RenderError> {
        let mut directors = Vec::new();
        for director in director_order(snapshot) {
            if director.r#virtual {
                continue;
            }
            check_route_expression(&director.name, &director.route_expression)?;
            let pattern = Pattern::compiled(&director.route_expression, Compile::OnFirstUse)
                .map_err(|reason| RenderError::InvalidRouteExpression {
                    director: director.name.clone(),
                    reason,
                })?;
            directors.push(DirectorRule {
                id: director.id,
                name: director.name.clone(),
                by_path: director.router() != DirectorRouter::Domain,
                pattern,
                https_only: is_https_only(director),
            });
        }
        let names: HashMap<i64, &str> = directors
            .iter()
            .map(|director| (director.id, director.name.as_str()))
            .collect();
        let mut routes: Vec<(&Route, &str)> = snapshot
            .routes
            .iter()
            .filter_map(|route| Some((route, *names.get(&route.director_id)?)))
            .collect();
        routes.sort_by_key(|(route, _)| (route.priority, route.id));
        let routes = routes
            .into_iter()
            .map(|(route, director)| route_rule(route, director))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RoutingTable {
            redirects: RedirectTable::build(snapshot)?,
            routes,
            directors,
        })
    }

    /// The part of the table a shard VCL needs: the routes to, and the rules of, the directors
    /// named in `directors`, in the same order; no redirects.
    pub(crate) fn for_directors(&self, directors: &BTreeSet<&str>) -> RoutingTable {
        RoutingTable {
            redirects: RedirectTable::default(),
            routes: self
                .routes
                .iter()
                .filter(|route| directors.contains(route.director.as_str()))
                .cloned()
                .collect(),
            directors: self
                .directors
                .iter()
                .filter(|director| directors.contains(director.name.as_str()))
                .cloned()
                .collect(),
        }
    }

    /// Returns what the router picks for `request`.
    pub fn decide(&self, request: &Request) -> Decision {
        if let Some(redirect) = self.redirects.decide(request) {
            return Decision {
                route_id: None,
                action: None,
                director_id: None,
                director: None,
                redirect: Some(redirect),
            };
        }
        let route = self.routes.iter().find(|route| route.holds(request));
        let director = match route {
            Some(route) => self.directors.iter().find(|d| d.id == route.director_id),
            None => self.directors.iter().find(|director| {
                let subject = if director.by_path {
                    &request.url
                } else {
                    &request.host
                };
                director.pattern.matches(subject)
            }),
        };
        let plain_http = request.header(FORWARDED_PROTO_HEADER) != Some("https");
        let redirect = director
            .filter(|director| director.https_only && plain_http)
            .map(|_| RedirectDecision {
                redirect_id: None,
                status: 301,
                location: format!("https://{}{}", request.host, request.url),
            });
        Decision {
            route_id: route.map(|route| route.id),
            action: route.map(|route| route.action),
            director_id: director.map(|director| director.id),
            director: director.map(|director| director.name.clone()),
            redirect,
        }
    }
}

fn route_rule(route: &Route, director: &str) -> Result<RouteRule, RenderError> {
    let invalid = |reason: String| RenderError::InvalidRoute {
        route_id: route.id,
        reason,
    };
    if route.conditions.is_empty() {
        return Err(invalid("has no condition".into()));
    }
    let conditions = route
        .conditions
        .iter()
        .enumerate()
        .map(|(index, condition)| {
            ConditionRule::new(condition, Compile::OnFirstUse)
                .map_err(|reason| format!("conditions[{index}].{reason}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let action = match route.action() {
        RouteAction::Pipe => RouteAction::Pipe,
        RouteAction::Pass | RouteAction::Unspecified => RouteAction::Pass,
    };
    Ok(RouteRule {
        id: route.id,
        director_id: route.director_id,
        director: director.to_owned(),
        action,
        conditions,
    })
}

/// Checks the examples of every route and redirect of the snapshot, as its VCL would route them:
/// see [`check_positive_urls`] and [`check_assertions`]. The error names the route or redirect
/// and the URL.
pub fn check_examples(snapshot: &ClusterSnapshot) -> Result<(), String> {
    let table = RoutingTable::build(snapshot).map_err(|error| error.to_string())?;
    check_assertions(snapshot, &table)?;
    check_positive_urls(snapshot, &table)
}

/// Checks every redirect's assertions: the given URL (with the redirect's required header, when
/// it has one) must be answered by that redirect with the expected Location.
pub fn check_assertions(snapshot: &ClusterSnapshot, table: &RoutingTable) -> Result<(), String> {
    let cluster = cluster_suffix(snapshot);
    for redirect in &snapshot.redirects {
        let applies = table
            .redirects
            .groups
            .iter()
            .any(|group| group.redirects.iter().any(|rule| rule.id == redirect.id));
        if !applies {
            continue;
        }
        for assertion in &redirect.assertions {
            let url = &assertion.given_url;
            let mut request = Request::from_absolute_url(url).map_err(|reason| {
                format!("redirect {}: given URL {url:?} {reason}", redirect.id)
            })?;
            if let Some(header) = &redirect.required_header {
                let value = if header.value.is_empty() {
                    "1"
                } else {
                    &header.value
                };
                request
                    .headers
                    .push((header.name.clone(), value.to_owned()));
            }
            let answer = table.decide(&request).redirect;
            let expected = &assertion.expected_location;
            let got = match &answer {
                Some(answer)
                    if answer.redirect_id == Some(redirect.id) && &answer.location == expected =>
                {
                    continue;
                }
                Some(answer) if answer.redirect_id == Some(redirect.id) => {
                    format!("it answers Location {:?}", answer.location)
                }
                Some(answer) => match answer.redirect_id {
                    Some(other) => format!("redirect {other} answers it first"),
                    None => "it is redirected to HTTPS".to_owned(),
                },
                None => "no redirect answers it".to_owned(),
            };
            return Err(format!(
                "redirect {}: assertion {url:?} expects Location {expected:?}, but {got}{cluster}",
                redirect.id
            ));
        }
    }
    Ok(())
}

fn cluster_suffix(snapshot: &ClusterSnapshot) -> String {
    snapshot
        .cluster
        .as_ref()
        .map_or_else(String::new, |cluster| {
            format!(" in cluster {}", cluster.name)
        })
}

/// Checks the positive URLs of every route of the snapshot: each must reach its route's
/// director, and no redirect may answer it first. A route that compares the canary random number
/// is checked with the first number from 0 to 99 its conditions accept.
pub fn check_positive_urls(snapshot: &ClusterSnapshot, table: &RoutingTable) -> Result<(), String> {
    let cluster = snapshot
        .cluster
        .as_ref()
        .map_or_else(String::new, |cluster| {
            format!(" in cluster {}", cluster.name)
        });
    for route in &snapshot.routes {
        let Some(rule) = table.routes.iter().find(|rule| rule.id == route.id) else {
            continue;
        };
        for url in &route.positive_urls {
            let mut request = Request::from_absolute_url(url)
                .map_err(|reason| format!("route {}: positive URL {url:?} {reason}", route.id))?;
            let draws = if rule.uses_canary_random() {
                0..CANARY_RANGE
            } else {
                0..1
            };
            let chosen = draws
                .map(|canary_random| {
                    request.canary_random = canary_random;
                    request.clone()
                })
                .find(|request| rule.holds(request));
            let Some(request) = chosen else {
                return Err(format!(
                    "route {}: positive URL {url:?} does not match the route's conditions{cluster}",
                    route.id
                ));
            };
            let decision = table.decide(&request);
            let redirected = decision
                .redirect
                .as_ref()
                .and_then(|redirect| redirect.redirect_id);
            if redirected.is_some() || decision.director_id != Some(rule.director_id) {
                let went = match (redirected, decision.route_id, decision.director) {
                    (Some(redirect), _, _) => format!("redirect {redirect} answers it"),
                    (None, Some(other), Some(director)) => {
                        format!("route {other} sends it to director {director}")
                    }
                    (None, None, Some(director)) => format!("it reaches director {director}"),
                    _ => "no director matches it".to_owned(),
                };
                return Err(format!(
                    "route {}: positive URL {url:?} must reach director {}, but {went}{cluster}",
                    route.id, rule.director
                ));
            }
        }
    }
    Ok(())
}
