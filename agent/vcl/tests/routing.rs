//! The router's decision computed in Rust (for positive URLs and Explain) against the fixture the
//! compile tests load into varnishd: routes by priority, then directors, and the refusals of
//! positive URLs that would reach another director.

mod fixtures;

use vaas_proto::v1::RouteAction;
use vaas_vcl::routing::{Request, RoutingTable, check_examples as check_positive_urls};

fn request(url: &str, host: &str, headers: &[(&str, &str)], canary_random: u32) -> Request {
    Request {
        url: url.into(),
        host: host.into(),
        headers: headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect(),
        canary_random,
    }
}

/// (route id, director name) that the fixture's router picks.
fn picked(request: &Request) -> (Option<i64>, Option<String>) {
    let table = RoutingTable::build(&fixtures::routes()).expect("the fixture builds");
    let decision = table.decide(request);
    (decision.route_id, decision.director)
}

#[test]
fn the_first_route_by_priority_whose_conditions_all_hold_wins() {
    // Route 41 (priority 5): canary random below 10 and Host example.com, to api, piped.
    let table = RoutingTable::build(&fixtures::routes()).expect("the fixture builds");
    let canary = table.decide(&request("/api/v2/x", "example.com", &[("X-Beta", "1")], 3));
    assert_eq!(canary.route_id, Some(41));
    assert_eq!(canary.director.as_deref(), Some("api"));
    assert_eq!(canary.action, Some(RouteAction::Pipe));
    // The same request with another draw falls to route 40 (header and URL), to www.
    assert_eq!(
        picked(&request("/api/v2/x", "example.com", &[("x-beta", "1")], 50)),
        (Some(40), Some("www".into()))
    );
}

#[test]
fn negated_conditions_hold_for_absent_headers_and_other_values() {
    // Route 42: URL not ending in .css and User-Agent not "bot", to the empty director.
    assert_eq!(
        picked(&request("/page", "other.org", &[], 50)),
        (Some(42), Some("empty".into()))
    );
    assert_eq!(
        picked(&request(
            "/page",
            "other.org",
            &[("User-Agent", "curl")],
            50
        ))
        .0,
        Some(42)
    );
    // A bot, or a stylesheet, goes past the routes to the directors: none matches "/page".
    assert_eq!(
        picked(&request("/page", "other.org", &[("User-Agent", "bot")], 50)),
        (None, None)
    );
    assert_eq!(
        picked(&request("/api/site.css", "other.org", &[], 50)),
        (None, Some("api".into()))
    );
}

#[test]
fn without_a_route_host_routers_come_before_path_routers() {
    let decision = picked(&request("/api/site.css", "www.example.com", &[], 50));
    assert_eq!(decision, (None, Some("www".into())));
}

#[test]
fn routes_to_virtual_or_missing_directors_are_never_taken() {
    // Routes 43 and 44 (priority 1) match every URL, but name a virtual director and one the
    // cluster does not have.
    let decision = picked(&request("/hidden/x.css", "other.org", &[], 50));
    assert_eq!(decision, (None, None));
}

#[test]
fn absolute_urls_become_the_request_a_client_sends() {
    let parsed = Request::from_absolute_url("https://Example.com:8443/a/b?q=1#top").unwrap();
    assert_eq!(parsed.host, "Example.com:8443");
    assert_eq!(parsed.url, "/a/b?q=1");
    assert_eq!(Request::from_absolute_url("http://h?x").unwrap().url, "/?x");
    for bad in [
        "ftp://h/",
        "http:///x",
        "http://h/a b",
        "http://h\"/",
        "/relative",
    ] {
        assert!(Request::from_absolute_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn positive_urls_that_reach_their_route_pass_the_check() {
    let mut snapshot = fixtures::routes();
    snapshot.routes[0].positive_urls = vec!["http://example.com/api/v2/users".into()];
    // Without the X-Beta header the URL cannot match route 40's conditions.
    let refused = check_positive_urls(&snapshot).unwrap_err();
    assert!(
        refused.contains("route 40")
            && refused.contains("http://example.com/api/v2/users")
            && refused.contains("does not match the route's conditions"),
        "{refused}"
    );
    // Route 41's canary URL is checked with a draw its conditions accept.
    let mut snapshot = fixtures::routes();
    snapshot.routes[1].positive_urls = vec!["http://example.com/anything".into()];
    assert_eq!(check_positive_urls(&snapshot), Ok(()));
}

#[test]
fn a_positive_url_taken_by_an_earlier_route_is_refused_naming_both() {
    let mut snapshot = fixtures::routes();
    // Route 42 (empty director) would take /page, but a new route 45 of priority 2 to api
    // matching every URL takes it first.
    snapshot.routes[2].positive_urls = vec!["http://other.org/page".into()];
    assert_eq!(check_positive_urls(&snapshot), Ok(()));
    snapshot.routes.push(fixtures::route(
        45,
        2,
        20,
        vec![fixtures::condition(
            vaas_proto::v1::RouteLeft::Url,
            "",
            vaas_proto::v1::RouteOperator::Matches,
            "^/",
        )],
    ));
    let refused = check_positive_urls(&snapshot).unwrap_err();
    assert!(
        refused.contains("route 42")
            && refused.contains("must reach director empty")
            && refused.contains("route 45 sends it to director api"),
        "{refused}"
    );
}

#[test]
fn explain_names_the_route_the_director_its_backend_groups_or_the_404() {
    let snapshot = fixtures::multi_dc();
    let api = vaas_vcl::explain(
        &snapshot,
        fixtures::SERVER_ID,
        &request("/api/x", "h", &[], 0),
    )
    .expect("explains");
    assert_eq!(
        api.version,
        vaas_vcl::render(&snapshot, fixtures::SERVER_ID)
            .unwrap()
            .version
    );
    assert_eq!(api.decision.director.as_deref(), Some("api"));
    assert_eq!(api.decision.route_id, None);
    // Own DC (1) first, then the others by id; the disabled backend 35 is left out.
    let groups: Vec<(i64, Vec<i64>)> = api
        .backend_groups
        .iter()
        .map(|group| (group.dc_id, group.backend_ids.clone()))
        .collect();
    assert_eq!(groups, [(1, vec![30]), (2, vec![31]), (3, vec![32])]);
    assert_eq!(api.synthetic, None);

    let empty = vaas_vcl::explain(
        &snapshot,
        fixtures::SERVER_ID,
        &request("/empty/", "h", &[], 0),
    )
    .expect("explains");
    assert_eq!(
        empty.synthetic,
        Some((404, "director empty has no backends".into()))
    );
    let none = vaas_vcl::explain(&snapshot, fixtures::SERVER_ID, &request("/x", "h", &[], 0))
        .expect("explains");
    assert_eq!(
        none.synthetic,
        Some((404, "no director matches the request".into()))
    );
}
