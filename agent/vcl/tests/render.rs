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
