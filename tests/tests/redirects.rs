//! End-to-end: domain mappings and redirects through the gRPC API on both stores, answered by a
//! real varnishd — a dynamic mapping filled from the cluster's labels, a redirect rewriting the
//! URL's groups into its destination and keeping the query string — and the changes refused
//! because they would break the redirect's assertion (its destination, the cluster's label), with
//! nothing saved.

use anyhow::{Context, Result};
use tonic::Code;
use vaas_proto::v1::{
    Cluster, CreateDomainMappingRequest, CreateRedirectRequest, DeleteDomainMappingRequest,
    DomainMapping, DomainMappingType, ExplainRequest, GetRedirectRequest, Redirect,
    RedirectAssertion, TaskState, UpdateClusterRequest, UpdateRedirectRequest,
};
use vaas_testkit::http_get;
use vaas_tests::{StoreKind, System, assert_invalid_argument, on_both_stores};

on_both_stores!(a_redirect_answers_as_asserted_and_changes_that_break_its_assertion_are_refused);

/// The host the dynamic mapping stands for in a cluster labelled env:prod.
const HOST: &str = "shop.prod.example.net";

/// The redirect's assertion: the URL asked for and the Location expected.
const GIVEN: &str = "http://shop.prod.example.net/old/a?b=1";
const EXPECTED: &str = "https://shop.example.net/new/a?b=1";

fn mask(path: &str) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: vec![path.to_owned()],
    })
}

async fn a_redirect_answers_as_asserted_and_changes_that_break_its_assertion_are_refused(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let cluster = system.cluster(setup.cluster_id).await?;
    system
        .config()
        .update_cluster(UpdateClusterRequest {
            cluster: Some(Cluster {
                labels: vec!["env:prod".into()],
                ..cluster
            }),
            update_mask: mask("labels"),
        })
        .await?;
    let mapping = system
        .config()
        .create_domain_mapping(CreateDomainMappingRequest {
            domain_mapping: Some(DomainMapping {
                domain: "shop.example.net".into(),
                mappings: vec!["shop.{env}.example.net".into()],
                r#type: DomainMappingType::Dynamic as i32,
                cluster_ids: vec![setup.cluster_id],
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .domain_mapping
        .context("domain mapping")?;
    let created = system
        .config()
        .create_redirect(CreateRedirectRequest {
            redirect: Some(Redirect {
                source_domain_id: mapping.id,
                condition: "^/old/([^?]*)".into(),
                rewrite_groups: true,
                destination: "https://shop.example.net/new/\\1".into(),
                status: 308,
                priority: 1,
                preserve_query: true,
                assertions: vec![RedirectAssertion {
                    given_url: GIVEN.into(),
                    expected_location: EXPECTED.into(),
                }],
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    assert_eq!(created.tasks[0].state, TaskState::Success as i32);
    let redirect = created.redirect.context("redirect")?;

    let answer = http_get(system.varnishd(0).http_addr(), "/old/a?b=1", HOST).await?;
    assert_eq!(answer.status, 308, "{answer:?}");
    assert_eq!(answer.header("location"), Some(EXPECTED), "{answer:?}");
    // Explain predicts the same answer, naming the redirect.
    let explained = system
        .status()
        .explain(ExplainRequest {
            server_id: setup.server_id,
            url: GIVEN.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(explained.redirected && explained.running, "{explained:?}");
    assert_eq!(explained.redirect_id, redirect.id);
    assert_eq!(
        (explained.synthetic_status, explained.location.as_str()),
        (308, EXPECTED)
    );

    // The destination changed so that the assertion no longer holds.
    let moved = system
        .config()
        .update_redirect(UpdateRedirectRequest {
            redirect: Some(Redirect {
                destination: "https://elsewhere.example.net/\\1".into(),
                ..redirect.clone()
            }),
            update_mask: mask("destination"),
        })
        .await
        .expect_err("the assertion no longer holds");
    let name = format!("redirect {}", redirect.id);
    assert_invalid_argument(
        &moved,
        "redirect",
        &[&name, GIVEN, "https://elsewhere.example.net/a?b=1"],
    );

    // The cluster's label changed, so the mapping no longer stands for the asserted host.
    let relabelled = system
        .config()
        .update_cluster(UpdateClusterRequest {
            cluster: Some(Cluster {
                labels: vec!["env:test".into()],
                ..system.cluster(setup.cluster_id).await?
            }),
            update_mask: mask("labels"),
        })
        .await
        .expect_err("the mapped host disappears");
    assert_invalid_argument(
        &relabelled,
        "cluster",
        &[&name, GIVEN, "no redirect answers it"],
    );

    // A second redirect of the same priority for the domain, and deleting the mapping in use.
    let same_priority = system
        .config()
        .create_redirect(CreateRedirectRequest {
            redirect: Some(Redirect {
                id: 0,
                assertions: Vec::new(),
                ..redirect.clone()
            }),
        })
        .await
        .expect_err("priorities are unique per source domain");
    assert_eq!(
        same_priority.code(),
        Code::AlreadyExists,
        "{same_priority:?}"
    );
    let deleted = system
        .config()
        .delete_domain_mapping(DeleteDomainMappingRequest { id: mapping.id })
        .await
        .expect_err("a mapping with redirects cannot be deleted");
    assert_eq!(deleted.code(), Code::FailedPrecondition, "{deleted:?}");

    // Nothing of the refused changes was saved, and varnishd answers as before.
    let stored = system
        .config()
        .get_redirect(GetRedirectRequest { id: redirect.id })
        .await?
        .into_inner()
        .redirect
        .context("redirect")?;
    assert_eq!(stored, redirect);
    assert_eq!(system.cluster(setup.cluster_id).await?.labels, ["env:prod"]);
    let answer = http_get(system.varnishd(0).http_addr(), "/old/a?b=1", HOST).await?;
    assert_eq!(answer.header("location"), Some(EXPECTED), "{answer:?}");
    system.ensure_running()
}
