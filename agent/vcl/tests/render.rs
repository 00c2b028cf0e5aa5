//! Snapshot tests of the rendered VCL, and the renderer's validation errors.

mod fixtures;

use fixtures::SERVER_ID;
use vaas_vcl::{RenderError, render};

fn rendered(snapshot: &vaas_proto::v1::ClusterSnapshot) -> String {
    match render(snapshot, SERVER_ID) {
        Ok(vcl) => vcl.text,
        Err(error) => panic!("render failed: {error}"),
    }
}

#[test]
fn empty_cluster() {
    insta::assert_snapshot!(rendered(&fixtures::empty_cluster()));
}

#[test]
fn one_director() {
    insta::assert_snapshot!(rendered(&fixtures::one_director("10.1.0.1", 80)));
}

#[test]
fn multi_dc_active_active() {
    insta::assert_snapshot!(rendered(&fixtures::multi_dc()));
}

#[test]
fn multi_dc_from_another_dc() {
    // The same cluster seen from a server in "waw": its own DC comes first.
    let mut snapshot = fixtures::multi_dc();
    snapshot.servers[0].dc_id = 2;
    insta::assert_snapshot!(rendered(&snapshot));
}

#[test]
fn canary_server() {
    insta::assert_snapshot!(rendered(&fixtures::canary(true)));
}

#[test]
fn regular_server_keeps_canary_backends_with_their_weight() {
    let text = rendered(&fixtures::canary(false));
    assert!(text.contains("api_fra_1.add_backend(api_31_fra_1_10_1_0_2_80, 0.0);"));
    assert!(text.contains("api_fra_1.add_backend(api_30_fra_1_10_1_0_1_80, 10.0);"));
}

#[test]
fn director_modes_in_maintenance() {
    insta::assert_snapshot!(rendered(&fixtures::modes()));
}

#[test]
fn custom_template() {
    insta::assert_snapshot!(rendered(&fixtures::custom_template()));
}

#[test]
fn ipv6() {
    insta::assert_snapshot!(rendered(&fixtures::ipv6()));
}

#[test]
fn version_is_the_hash_of_the_text_and_appears_in_it() {
    let vcl = render(&fixtures::one_director("10.1.0.1", 80), SERVER_ID).expect("render");
    assert_eq!(vcl.version.len(), 16);
    assert!(
        vcl.version
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert!(
        vcl.text
            .contains(&format!("X-VaaS-VCL-Version = \"{}\"", vcl.version))
    );
    let again = render(&fixtures::one_director("10.1.0.1", 80), SERVER_ID).expect("render");
    assert_eq!(vcl, again);
    let other = render(&fixtures::one_director("10.1.0.2", 80), SERVER_ID).expect("render");
    assert_ne!(vcl.version, other.version);
}

#[test]
fn output_does_not_depend_on_input_order() {
    let mut snapshot = fixtures::multi_dc();
    let sorted = rendered(&snapshot);
    snapshot.backends.reverse();
    snapshot.directors.reverse();
    snapshot.dcs.reverse();
    assert_eq!(rendered(&snapshot), sorted);
}

#[test]
fn unknown_server_is_an_error() {
    assert_eq!(
        render(&fixtures::empty_cluster(), 7),
        Err(RenderError::ServerNotFound { server_id: 7 })
    );
}

#[test]
fn missing_template_is_an_error() {
    let mut snapshot = fixtures::empty_cluster();
    snapshot.templates.clear();
    let error = render(&snapshot, SERVER_ID).expect_err("no template");
    assert_eq!(
        error.to_string(),
        "template 10 of server 100 is not in the snapshot"
    );
}

#[test]
fn missing_dc_is_an_error() {
    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.backends[0].dc_id = 9;
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::DcNotFound { dc_id: 9 })
    );
    let mut snapshot = fixtures::empty_cluster();
    snapshot.servers[0].dc_id = 9;
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::DcNotFound { dc_id: 9 })
    );
}

#[test]
fn route_expression_cannot_close_the_long_string() {
    for expression in ["^/a\"}; }", "^/a\n", "^/a\r", "^/\u{0}", "\t"] {
        let mut snapshot = fixtures::one_director("10.1.0.1", 80);
        snapshot.directors[0].route_expression = expression.into();
        let error = render(&snapshot, SERVER_ID).expect_err(expression);
        assert!(
            matches!(error, RenderError::InvalidRouteExpression { .. }),
            "{expression:?}: {error}"
        );
    }
    // A quote or a brace alone is harmless inside {"..."}.
    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.directors[0].route_expression = "^/a\"b{2}\\}".into();
    assert!(render(&snapshot, SERVER_ID).is_ok());
}

#[test]
fn route_expression_error_message() {
    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.directors[0].route_expression = "x\"}".into();
    let error = render(&snapshot, SERVER_ID).expect_err("invalid");
    assert_eq!(
        error.to_string(),
        "route expression of director api contains \"}\""
    );
}

#[test]
fn addresses_must_be_ip_addresses() {
    for address in [
        "example.com",
        "10.0.0.1\"; }",
        "10.0.0.256",
        "",
        " 10.0.0.1",
        "[::1]",
    ] {
        let snapshot = fixtures::one_director(address, 80);
        assert_eq!(
            render(&snapshot, SERVER_ID),
            Err(RenderError::InvalidAddress {
                backend_id: 30,
                address: address.into()
            })
        );
    }
}

#[test]
fn ports_must_be_valid() {
    for port in [0, 65536] {
        let snapshot = fixtures::one_director("10.0.0.1", port);
        assert_eq!(
            render(&snapshot, SERVER_ID),
            Err(RenderError::InvalidPort {
                backend_id: 30,
                port
            })
        );
    }
}

#[test]
fn negative_timeouts_are_rejected() {
    let mut snapshot = fixtures::one_director("10.0.0.1", 80);
    snapshot.backends[0].first_byte_timeout = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::InvalidTimeout {
            backend_id: 30,
            field: "first_byte_timeout"
        })
    );
}

#[test]
fn director_names_are_revalidated() {
    let mut snapshot = fixtures::one_director("10.0.0.1", 80);
    snapshot.directors[0].name = "api\"); }".into();
    assert!(matches!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::InvalidDirectorName {
            director_id: 20,
            ..
        })
    ));
}

#[test]
fn dc_symbols_are_revalidated() {
    let mut snapshot = fixtures::one_director("10.0.0.1", 80);
    snapshot.dcs[0].symbol = "fra 1".into();
    assert!(matches!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::InvalidDcSymbol { dc_id: 1, .. })
    ));
}

#[test]
fn colliding_names_are_rejected() {
    // Director "api" in dc "x_y" and director "api_x" in dc "y" would share one object name.
    let mut snapshot = fixtures::empty_cluster();
    snapshot.dcs = vec![fixtures::dc(1, "y"), fixtures::dc(2, "x_y")];
    snapshot.directors = vec![
        fixtures::director(20, "api", "^/a"),
        fixtures::director(21, "api_x", "^/b"),
    ];
    snapshot.backends = vec![
        fixtures::backend(30, 20, 2, "10.0.0.1"),
        fixtures::backend(31, 21, 1, "10.0.0.2"),
    ];
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::NameCollision {
            name: "api_x_y".into()
        })
    );
}

#[test]
fn disabled_directors_and_backends_are_left_out() {
    let mut snapshot = fixtures::multi_dc();
    snapshot.directors[0].enabled = Some(false);
    let text = rendered(&snapshot);
    assert!(!text.contains("^/api/"));
    assert!(!text.contains("api_30"));
    assert!(!text.contains("10.1.0.9"));
}

/// Returns the body of the block that starts with `header` (up to its closing `}` line).
fn block<'a>(text: &'a str, header: &str) -> &'a str {
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("no {header:?} in:\n{text}"));
    let rest = &text[start..];
    let end = rest.find("\n}").expect("block end");
    &rest[..end + 2]
}

#[test]
fn probes() {
    insta::assert_snapshot!(rendered(&fixtures::probed()));
}

#[test]
fn probes_are_declared_once_and_named_on_every_backend_of_their_directors() {
    let text = rendered(&fixtures::probed());
    // Shared by two directors, declared once, lower-cased and prefixed.
    assert_eq!(text.matches("probe probe_health {").count(), 1, "{text}");
    let health = block(&text, "probe probe_health {");
    for line in [
        ".url = \"/health\";",
        ".expected_response = 200;",
        ".interval = 3s;",
        ".timeout = 1s;",
        ".window = 5;",
        ".threshold = 3;",
        // start_as_healthy: starts with enough good probes to be healthy.
        ".initial = 3;",
    ] {
        assert!(health.contains(line), "{line} missing in:\n{health}");
    }
    let deep = block(&text, "probe probe_deep_check {");
    for line in [
        ".url = \"/status/deep?full=1&x=%20\";",
        ".expected_response = 204;",
        ".interval = 1.5s;",
        ".timeout = 0.25s;",
        ".window = 8;",
        ".threshold = 6;",
        // Not start_as_healthy: one good probe short of healthy, Varnish's own default.
        ".initial = 5;",
    ] {
        assert!(deep.contains(line), "{line} missing in:\n{deep}");
    }
    for backend in [
        "backend api_30_fra_1_10_1_0_1_80 {",
        "backend api_31_waw_10_2_0_1_80 {",
        "backend search_32_fra_1_10_1_0_2_80 {",
    ] {
        let body = block(&text, backend);
        assert!(body.contains(".probe = probe_health;"), "{body}");
    }
    let body = block(&text, "backend deep_33_fra_1_10_1_0_3_80 {");
    assert!(body.contains(".probe = probe_deep_check;"), "{body}");
    // Probes come before the backends that name them; the placeholder stays the first backend.
    let first_backend = text.find("\nbackend ").expect("a backend");
    assert!(text.find("probe probe_deep_check {").expect("probe") < first_backend);
    assert!(text[first_backend..].starts_with("\nbackend vaas_no_backend {"));
    // The probe of a director without backends would be unused: varnishd refuses that.
    assert!(!text.contains("probe_unused"), "{text}");
}

#[test]
fn probes_at_the_limits() {
    let text = rendered(&fixtures::probe_limits());
    let widest = block(&text, "probe probe_widest {");
    for line in [
        ".url = \"/!#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\";",
        ".expected_response = 599;",
        ".interval = 300s;",
        ".timeout = 5s;",
        ".window = 64;",
        ".threshold = 64;",
        ".initial = 64;",
    ] {
        assert!(widest.contains(line), "{line} missing in:\n{widest}");
    }
    let narrowest = block(&text, "probe probe_n {");
    for line in [
        ".url = \"/\";",
        ".expected_response = 100;",
        ".interval = 0.001s;",
        ".timeout = 0.001s;",
        ".window = 1;",
        ".threshold = 1;",
        ".initial = 0;",
    ] {
        assert!(narrowest.contains(line), "{line} missing in:\n{narrowest}");
    }
}

#[test]
fn backends_without_a_probe_have_no_probe_line() {
    let text = rendered(&fixtures::multi_dc());
    assert!(!text.contains(".probe"), "{text}");
    assert!(!text.contains("\nprobe "), "{text}");
}

#[test]
fn time_profiles() {
    insta::assert_snapshot!(rendered(&fixtures::time_profiles()));
}

#[test]
fn inheriting_backends_take_the_time_profile_and_others_keep_their_own() {
    let text = rendered(&fixtures::time_profiles());
    let from_profile = [
        ".max_connections = 40;",
        ".connect_timeout = 2s;",
        ".first_byte_timeout = 60s;",
        ".between_bytes_timeout = 10.5s;",
    ];
    let own = [
        ".max_connections = 7;",
        ".connect_timeout = 0.1s;",
        ".first_byte_timeout = 3s;",
        ".between_bytes_timeout = 2s;",
    ];
    let defaults = [
        ".max_connections = 5;",
        ".connect_timeout = 0.3s;",
        ".first_byte_timeout = 5s;",
        ".between_bytes_timeout = 1s;",
    ];
    for (backend, expected) in [
        ("backend api_30_fra_1_10_1_0_1_80 {", from_profile),
        ("backend api_31_fra_1_10_1_0_2_80 {", own),
        ("backend bare_32_fra_1_10_1_0_3_80 {", defaults),
        ("backend none_33_fra_1_10_1_0_4_80 {", own),
    ] {
        let body = block(&text, backend);
        for line in expected {
            assert!(body.contains(line), "{line} missing in:\n{body}");
        }
    }
}

#[test]
fn hashing_policies() {
    insta::assert_snapshot!(rendered(&fixtures::hashing()));
}

#[test]
fn hash_directors_hash_the_cookie_or_the_url() {
    let text = rendered(&fixtures::hashing());
    let router = block(&text, "if (req.url ~ {\"^/cart/\"}) {");
    assert!(
        router.contains("set req.backend_hint = sticky_fra_1.backend(req.http.cookie);"),
        "{router}"
    );
    // The fallback to the other DC hashes the same way.
    assert!(
        router.contains("set req.backend_hint = sticky_waw.backend(req.http.cookie);"),
        "{router}"
    );
    assert!(text.contains("set req.backend_hint = by_url_fra_1.backend(req.url);"));
    // The policy only matters to hash directors.
    assert!(text.contains("set req.backend_hint = rr_fra_1.backend();"));
}

#[test]
fn remove_path() {
    insta::assert_snapshot!(rendered(&fixtures::remove_path()));
}

#[test]
fn remove_path_rewrites_the_url_after_choosing_the_backend_of_path_routers_only() {
    let text = rendered(&fixtures::remove_path());
    let rewrite = "set req.url = regsub(req.url, {\"^/api/\"}, \"/\");";
    assert_eq!(text.matches(rewrite).count(), 1, "{text}");
    let router = block(&text, "elsif (req.url ~ {\"^/api/\"}) {");
    let fallback = router.find("api_waw.backend()").expect("fallback");
    assert!(
        router.find(rewrite).expect("rewrite") > fallback,
        "{router}"
    );
    // A host router has no path to remove; a director without backends answers 404 anyway.
    assert_eq!(text.matches("regsub").count(), 1, "{text}");
}

#[test]
fn virtual_directors() {
    insta::assert_snapshot!(rendered(&fixtures::virtual_director()));
}

#[test]
fn virtual_directors_are_declared_but_never_routed() {
    let text = rendered(&fixtures::virtual_director());
    let init = block(&text, "sub vcl_init {");
    assert!(
        init.contains("new shadow_fra_1 = directors.round_robin();"),
        "{init}"
    );
    assert!(
        init.contains("new shadow_waw = directors.round_robin();"),
        "{init}"
    );
    assert!(text.contains("backend shadow_31_fra_1_10_1_0_2_80 {"));
    assert!(text.contains("probe probe_shadow_health {"));
    let recv = block(&text, "sub vcl_recv {");
    assert!(!recv.contains("shadow"), "{recv}");
    assert!(!recv.contains("hollow"), "{recv}");
    assert!(recv.contains("api_fra_1.backend()"), "{recv}");
}

#[test]
fn only_virtual_directors_leave_nothing_to_route() {
    let text = rendered(&fixtures::only_virtual());
    let recv = block(&text, "sub vcl_recv {");
    assert!(
        recv.contains("return (synth(404, \"no director matches the request\"));"),
        "{recv}"
    );
    assert!(!recv.contains("backend_hint"), "{recv}");
}

#[test]
fn missing_probe_is_an_error() {
    let mut snapshot = fixtures::probed();
    snapshot.probes.retain(|probe| probe.id != 51);
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::ProbeNotFound {
            director: "deep".into(),
            probe_id: 51
        })
    );
    // Even for a director without backends: the reference is wrong all the same.
    let mut snapshot = fixtures::probed();
    snapshot.probes.retain(|probe| probe.id != 52);
    let error = render(&snapshot, SERVER_ID).expect_err("missing probe");
    assert_eq!(
        error.to_string(),
        "probe 52 of director empty is not in the snapshot"
    );
}

#[test]
fn missing_time_profile_is_an_error() {
    let mut snapshot = fixtures::time_profiles();
    snapshot.time_profiles.clear();
    let error = render(&snapshot, SERVER_ID).expect_err("missing time profile");
    assert_eq!(
        error,
        RenderError::TimeProfileNotFound {
            director: "api".into(),
            time_profile_id: 60
        }
    );
    assert_eq!(
        error.to_string(),
        "time profile 60 of director api is not in the snapshot"
    );
}

#[test]
fn invalid_time_profile_timeouts_are_rejected() {
    let mut snapshot = fixtures::time_profiles();
    snapshot.time_profiles[0].between_bytes_timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: -5,
    });
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::InvalidTimeProfile {
            time_profile_id: 60,
            field: "between_bytes_timeout"
        })
    );
}

#[test]
fn probe_urls_cannot_break_out_of_the_string() {
    for url in [
        "/health\"; } backend evil {",
        "/a b",
        "health",
        "",
        "/caf\u{e9}",
        "/a\n",
        "/a\t",
        &format!("/{}", "a".repeat(256)),
    ] {
        let mut snapshot = fixtures::probed();
        snapshot.probes[0].url = url.into();
        assert_eq!(
            render(&snapshot, SERVER_ID),
            Err(RenderError::InvalidProbeUrl {
                probe_id: 50,
                url: url.into()
            }),
            "{url:?}"
        );
    }
    let mut snapshot = fixtures::probed();
    snapshot.probes[0].url = format!("/{}", "a".repeat(255));
    assert!(render(&snapshot, SERVER_ID).is_ok());
}

#[test]
fn probe_names_are_revalidated() {
    for name in ["", "1health", "health-check", "health\"", &"h".repeat(51)] {
        let mut snapshot = fixtures::probed();
        snapshot.probes[0].name = name.into();
        assert_eq!(
            render(&snapshot, SERVER_ID),
            Err(RenderError::InvalidProbeName {
                probe_id: 50,
                name: name.into()
            }),
            "{name:?}"
        );
    }
}

#[test]
fn probe_settings_out_of_range_are_rejected() {
    use prost_types::Duration;
    type Change = fn(&mut vaas_proto::v1::Probe);
    let cases: [(&str, Change); 10] = [
        ("expected_response", |p| p.expected_response = Some(99)),
        ("expected_response", |p| p.expected_response = Some(600)),
        ("interval", |p| p.interval = Some(Duration::default())),
        ("interval", |p| {
            p.interval = Some(Duration {
                seconds: -1,
                nanos: 0,
            })
        }),
        ("timeout", |p| p.timeout = Some(Duration::default())),
        ("window", |p| p.window = Some(0)),
        ("window", |p| {
            p.window = Some(65);
            p.threshold = Some(1);
        }),
        ("threshold", |p| p.threshold = Some(0)),
        // The default window is 5.
        ("threshold", |p| p.threshold = Some(6)),
        ("threshold", |p| {
            p.window = Some(2);
            p.threshold = Some(3);
        }),
    ];
    for (field, change) in cases {
        let mut snapshot = fixtures::probed();
        change(&mut snapshot.probes[0]);
        assert_eq!(
            render(&snapshot, SERVER_ID),
            Err(RenderError::InvalidProbeSetting {
                probe_id: 50,
                field
            }),
            "{:?}",
            snapshot.probes[0]
        );
    }
    // The limits themselves are accepted.
    let mut snapshot = fixtures::probed();
    snapshot.probes[0].window = Some(64);
    snapshot.probes[0].threshold = Some(64);
    snapshot.probes[0].expected_response = Some(599);
    assert!(render(&snapshot, SERVER_ID).is_ok());
}

#[test]
fn a_probe_name_cannot_collide_with_another_symbol() {
    // Director "probe_health" in dc "x" has the object "probe_health_x"; probe "health_x" would
    // be "probe_health_x" too.
    let mut snapshot = fixtures::empty_cluster();
    snapshot.dcs = vec![fixtures::dc(1, "x")];
    snapshot.probes = vec![fixtures::probe(50, "Health_X", "/health")];
    let mut probed = fixtures::director(20, "api", "^/api/");
    probed.probe_id = 50;
    snapshot.directors = vec![probed, fixtures::director(21, "probe_health", "^/b/")];
    snapshot.backends = vec![
        fixtures::backend(30, 20, 1, "10.0.0.1"),
        fixtures::backend(31, 21, 1, "10.0.0.2"),
    ];
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::NameCollision {
            name: "probe_health_x".into()
        })
    );
}

#[test]
fn names_differing_only_in_case_collide() {
    // varnishd compares symbols regardless of case: "Api_fra_1" and "api_fra_1" are one name.
    let mut snapshot = fixtures::empty_cluster();
    snapshot.directors = vec![
        fixtures::director(20, "api", "^/a"),
        fixtures::director(21, "Api", "^/b"),
    ];
    snapshot.backends = vec![
        fixtures::backend(30, 20, 1, "10.0.0.1"),
        fixtures::backend(31, 21, 1, "10.0.0.2"),
    ];
    assert_eq!(
        render(&snapshot, SERVER_ID),
        Err(RenderError::NameCollision {
            name: "Api_fra_1".into()
        })
    );
}

#[test]
fn blocks_and_variables() {
    insta::assert_snapshot!(rendered(&fixtures::blocks_and_variables()));
}

#[test]
fn a_recv_block_replaces_the_built_in_recv_and_still_routes() {
    let text = rendered(&fixtures::blocks_and_variables());
    // The block's vcl_recv, not the built-in one, with the sub-tags it names expanded.
    let recv = block(&text, "sub vcl_recv {\n    if (req.method == \"PURGE\") {");
    assert!(
        recv.contains("set req.http.X-Backend = \"127.0.0.1:8080\";"),
        "{recv}"
    );
    assert!(
        recv.contains("    if (req.url == \"/vaas_status\""),
        "VAAS_STATUS indented like its tag:\n{recv}"
    );
    assert!(
        recv.contains(
            "    if (req.url ~ {\"^/api/\"}) {\n        set req.backend_hint = api_fra_1.backend();"
        ),
        "{recv}"
    );
    // The protocol-redirect block it names comes before it; the built-in vcl_recv is gone.
    assert_eq!(text.matches("sub vcl_recv {").count(), 2, "{text}");
    assert!(
        text.find("X-Forwarded-Proto").expect("prelude") < text.find("PURGE").expect("block"),
        "{text}"
    );
}

#[test]
fn a_protocol_redirect_block_comes_before_the_built_in_vcl_recv() {
    let text = rendered(&fixtures::protocol_redirect_block());
    let recv = text.find("sub vcl_recv {").expect("a vcl_recv");
    assert!(
        text[recv..].starts_with("sub vcl_recv {\n    if (!req.http.X-Forwarded-Proto) {"),
        "{text}"
    );
    let built_in = text.rfind("sub vcl_recv {").expect("a vcl_recv");
    assert!(
        text[built_in..].starts_with("sub vcl_recv {\n    if (req.url == \"/vaas_status\""),
        "{text}"
    );
    assert_eq!(text.matches("sub vcl_recv {").count(), 2, "{text}");
}

#[test]
fn an_acl_block_is_written_after_the_headers_of_a_vcl_template() {
    let text = rendered(&fixtures::blocks_and_variables());
    let acl = block(&text, "acl purgers {");
    assert_eq!(
        acl,
        "acl purgers {\n    \"127.0.0.1\";\n    \"10.0.0.1\";\n}"
    );
    assert!(text.find("import directors;").expect("headers") < text.find("acl").expect("acl"));
    assert!(text.find("acl").expect("acl") < text.find("backend ").expect("backends"));
}

#[test]
fn acl_and_protocol_redirect_without_a_block_stay_commented_out() {
    // The built-in VCL does not name them at all.
    let text = rendered(&fixtures::one_director("10.1.0.1", 80));
    assert!(!text.contains("ACL"), "{text}");
    assert!(!text.contains("PROPER_PROTOCOL_REDIRECT"), "{text}");
    // A template that names them gets them commented out, like any tag without a body.
    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.templates[0].content = "<HEADERS/>\n<ACL/>\n<PROPER_PROTOCOL_REDIRECT/>\n".into();
    let text = rendered(&snapshot);
    assert!(
        text.ends_with("import directors;\n/* <ACL/> */\n/* <PROPER_PROTOCOL_REDIRECT/> */\n"),
        "{text}"
    );
    // With a block, a custom template gets its content where it says <ACL/>.
    snapshot.template_blocks = vec![fixtures::template_block(
        70,
        10,
        "ACL",
        "acl a { \"::1\"; }",
    )];
    let text = rendered(&snapshot);
    assert!(
        text.ends_with(
            "import directors;\nacl a { \"::1\"; }\n/* <PROPER_PROTOCOL_REDIRECT/> */\n"
        ),
        "{text}"
    );
}

#[test]
fn blocks_of_other_templates_and_of_other_tags_are_ignored() {
    let text = rendered(&fixtures::blocks_and_variables());
    assert!(!text.contains("not for this template"), "{text}");
    assert!(!text.contains("not a tag that blocks replace"), "{text}");
    assert!(
        text.contains("return (synth(200, \"vaas_status\"));"),
        "{text}"
    );
}

#[test]
fn a_block_naming_its_own_tag_includes_the_built_in_body() {
    let text = rendered(&fixtures::blocks_and_variables());
    // The OTHER_FUNCTIONS block wraps the built-in: the version header stays, the team is added.
    let vcl = render(&fixtures::blocks_and_variables(), SERVER_ID).expect("render");
    let built_in = format!(
        "sub vcl_deliver {{\n    set resp.http.X-VaaS-VCL-Version = \"{}\";\n}}\n\n\
         sub vcl_deliver {{\n    set resp.http.X-Team = \"edge\";\n}}",
        vcl.version
    );
    assert!(text.contains(&built_in), "{text}");

    // A RECV block saying <RECV/> gets the built-in RECV there, once.
    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.template_blocks = vec![fixtures::template_block(
        70,
        10,
        "RECV",
        "sub vcl_recv {\n    set req.http.X-Seen = \"1\";\n}\n<RECV/>",
    )];
    let text = rendered(&snapshot);
    assert_eq!(text.matches("sub vcl_recv {").count(), 2, "{text}");
    assert_eq!(text.matches("X-Seen").count(), 1, "{text}");
    assert_eq!(text.matches("api_fra_1.backend()").count(), 1, "{text}");
}

#[test]
fn blocks_naming_each_other_end_at_the_built_in_bodies() {
    // VCL's block names RECV, whose block names VCL again: the inner VCL is the built-in one,
    // and the RECV inside it, already being expanded, is the built-in RECV.
    let mut snapshot = fixtures::one_director("10.1.0.1", 80);
    snapshot.template_blocks = vec![
        fixtures::template_block(70, 10, "VCL", "<HEADERS/>\n<RECV/>\n"),
        fixtures::template_block(71, 10, "RECV", "# custom recv\n<VCL/>"),
    ];
    let text = rendered(&snapshot);
    assert_eq!(text.matches("# custom recv").count(), 1, "{text}");
    assert_eq!(text.matches("vcl 4.1;").count(), 2, "{text}");
    assert_eq!(text.matches("sub vcl_recv {").count(), 1, "{text}");
    assert_eq!(text.matches("sub vcl_synth {").count(), 1, "{text}");
}

#[test]
fn cluster_variables_override_the_defaults_in_templates_and_blocks() {
    let mut snapshot = fixtures::custom_template();
    snapshot.variables = vec![
        fixtures::variable(80, "MESH_IP", "10.9.9.9"),
        fixtures::variable(81, "NOT_A_VARIABLE", "now-one"),
    ];
    let text = rendered(&snapshot);
    assert!(
        text.contains("# Mesh at 10.9.9.9:31001, unknown now-one\n"),
        "{text}"
    );
    assert!(text.contains("set beresp.http.x-service-mesh-timeout = \"1\";"));
}

#[test]
fn variables_never_alter_generated_text() {
    // A route expression may hold "#{...}": the router writes it as is.
    let mut snapshot = fixtures::blocks_and_variables();
    snapshot.directors[0].route_expression = "^/#{TEAM}/".into();
    let text = rendered(&snapshot);
    assert!(text.contains("if (req.url ~ {\"^/#{TEAM}/\"}) {"), "{text}");
    assert!(text.contains("set resp.http.X-Team = \"edge\";"), "{text}");
    // A value is written as is, never read again for tags.
    let mut snapshot = fixtures::empty_cluster();
    snapshot.templates[0].content = "<HEADERS/>\n# #{A}\n".into();
    snapshot.variables = vec![fixtures::variable(80, "A", "<VCL/>")];
    let text = rendered(&snapshot);
    assert!(text.ends_with("\n# <VCL/>\n"), "{text}");
}

#[test]
fn a_variable_value_that_could_change_the_structure_is_an_error() {
    for value in [
        "edge\"; }",
        "a{b",
        "a}",
        "a\\b",
        "a;",
        "line\nbreak",
        "\u{7}",
    ] {
        let mut snapshot = fixtures::blocks_and_variables();
        snapshot.variables[3].value = value.into();
        assert_eq!(
            render(&snapshot, SERVER_ID),
            Err(RenderError::InvalidVariableValue {
                key: "TEAM".into(),
                value: value.into()
            }),
            "{value:?}"
        );
    }
    // Even when no template or block uses it.
    let mut snapshot = fixtures::empty_cluster();
    snapshot.variables = vec![fixtures::variable(80, "UNUSED", "x\"")];
    let error = render(&snapshot, SERVER_ID).expect_err("invalid value");
    assert_eq!(
        error.to_string(),
        "variable UNUSED has an invalid value \"x\\\"\""
    );
}

#[test]
fn a_megabyte_of_lone_angle_brackets_is_copied_once() {
    // Tag scanning is linear by construction (see template.rs): this used to take minutes.
    let mut snapshot = fixtures::empty_cluster();
    let template = "<".repeat(1 << 20);
    snapshot.templates[0].content = template.clone();
    assert_eq!(rendered(&snapshot), template);
    // Unclosed variables and tags that never end are no worse.
    let template = format!("{}<{}", "#{".repeat(1 << 19), "A".repeat(1 << 20));
    snapshot.templates[0].content = template.clone();
    assert_eq!(rendered(&snapshot), template);
}

#[test]
fn a_template_repeating_vcl_fails_as_too_large_instead_of_growing_without_bound() {
    let mut snapshot = fixtures::multi_dc();
    snapshot.templates[0].content = "<VCL/>".repeat(100_000);
    let error = render(&snapshot, SERVER_ID).expect_err("too large");
    assert_eq!(
        error,
        RenderError::TooLarge {
            limit: vaas_vcl::MAX_EXPANSION_BYTES
        }
    );
    assert_eq!(
        error.to_string(),
        "the expanded template exceeds 33554432 bytes"
    );
    // Blocks that write nothing are bounded too, by what they read: see template.rs.
}

#[test]
fn rendered_vcl_that_would_read_files_or_run_code_is_refused() {
    // A variable is checked on its own, but what it assembles with the template is checked in the
    // rendered VCL: here a harmless-looking value completes `import … ;`.
    let mut snapshot = fixtures::empty_cluster();
    snapshot.templates[0].content = "<VCL/>\nimport #{VMOD};\n".into();
    snapshot.variables = vec![fixtures::variable(80, "VMOD", "vtc")];
    let error = render(&snapshot, SERVER_ID).expect_err("a test vmod import");
    assert!(matches!(error, RenderError::Forbidden { .. }), "{error}");

    snapshot.variables.clear();
    snapshot.templates[0].content = "<VCL/>\ninclude \"/etc/varnish/secret\";\n".into();
    let error = render(&snapshot, SERVER_ID).expect_err("an include");
    assert!(
        error.to_string().contains("include reads a file"),
        "{error}"
    );
}

#[test]
fn routes() {
    insta::assert_snapshot!(rendered(&fixtures::routes()));
}

#[test]
fn routes_come_by_priority_before_the_directors_and_skip_unroutable_directors() {
    let text = rendered(&fixtures::routes());
    let position = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{text}"))
    };
    // Priority 5 first; 40 and 42 share priority 10 and come by id; then the directors.
    assert!(position("# route 41") < position("# route 40"));
    assert!(position("# route 40") < position("# route 42"));
    assert!(position("# route 42") < position("if (req.http.host ~"));
    // Route 43 names a virtual director, 44 one the cluster does not have.
    assert!(!text.contains("# route 43") && !text.contains("# route 44"));
    // The empty director answers its 404 from the route as from its expression.
    let route_42 = &text[position("# route 42")..position("if (req.http.host ~")];
    assert!(
        route_42.contains("director empty has no backends"),
        "{route_42}"
    );
    assert!(!route_42.contains("return (pass)"), "{route_42}");
}

#[test]
fn a_client_cannot_choose_the_canary_random_number() {
    let text = rendered(&fixtures::routes());
    let drawn = text
        .find("set req.http.X-VaaS-Canary-Random = std.integer(real = std.random(0, 100));")
        .expect("the number is drawn");
    assert!(drawn < text.find("# route 41").expect("route 41"));
    // Removed before the request goes on, whichever way it goes.
    assert!(text.contains("unset req.http.X-VaaS-Canary-Random;\n        set req.backend_hint"));
    assert!(text.contains("}\n    unset req.http.X-VaaS-Canary-Random;\n    if (req.http.host"));
}

/// Everything that decides whether the text is safe VCL is checked again; whether an expression
/// compiles is the API's check when it is saved (with varnishd's engine) — compiling every
/// expression of a large cluster would cost more than the rest of the render.
#[test]
fn route_conditions_are_revalidated() {
    use vaas_proto::v1::{RouteLeft, RouteOperator};
    let cases = [
        (
            RouteLeft::Header,
            "X Bad",
            RouteOperator::Equal,
            "1",
            "conditions[0].header",
        ),
        (
            RouteLeft::Url,
            "",
            RouteOperator::Equal,
            "a\"}b",
            "conditions[0].value",
        ),
        (
            RouteLeft::Url,
            "",
            RouteOperator::Less,
            "1",
            "conditions[0].operator",
        ),
        (
            RouteLeft::CanaryRandom,
            "",
            RouteOperator::Matches,
            "1",
            "conditions[0].operator",
        ),
        (
            RouteLeft::CanaryRandom,
            "",
            RouteOperator::Less,
            "101",
            "conditions[0].value",
        ),
        (
            RouteLeft::Host,
            "X-A",
            RouteOperator::Equal,
            "a",
            "conditions[0].header",
        ),
    ];
    for (left, header, operator, value, field) in cases {
        let mut snapshot = fixtures::routes();
        snapshot.routes = vec![fixtures::route(
            50,
            1,
            20,
            vec![fixtures::condition(left, header, operator, value)],
        )];
        match render(&snapshot, SERVER_ID) {
            Err(RenderError::InvalidRoute {
                route_id: 50,
                reason,
            }) => {
                assert!(reason.starts_with(field), "{field}: {reason}");
            }
            other => panic!("{field}: expected an invalid route, got {other:?}"),
        }
    }
}

#[test]
fn canary_backends_in_a_datacenter_the_server_cannot_use_do_not_count() {
    // A director that is not active_active, with its only canary backend in another DC: the
    // canary server keeps the regular backend of its own DC instead of ending up with none.
    let mut snapshot = fixtures::canary(true);
    snapshot.directors[0].active_active = Some(false);
    snapshot.backends[1].dc_id = 2;
    let text = rendered(&snapshot);
    assert!(
        text.contains("api_fra_1.add_backend(api_30_fra_1_10_1_0_1_80"),
        "{text}"
    );
    assert!(!text.contains("director api has no backends"), "{text}");
}

#[test]
fn redirects() {
    insta::assert_snapshot!(rendered(&fixtures::redirects()));
}

#[test]
fn director_tags() {
    insta::assert_snapshot!(rendered(&fixtures::director_tags()));
}
