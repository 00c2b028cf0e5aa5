//! The Varnish state machine through a VaaS-rendered VCL in a real varnishd: a template hooks every
//! client-side and backend-side subroutine (in its own text, and through a block for `vcl_synth`,
//! whose built-in body ends with `return (deliver)`), each hook appends its state to a trail
//! header, and one request per path shows the path it took: miss, hit, purge, pass, pipe, synth and
//! backend error. Every path goes through `vcl_hash`, as Varnish 7 does (pass, pipe and a synth from
//! `vcl_recv` included).

use anyhow::{Context, Result};
use vaas_proto::v1::{
    CreateBackendRequest, CreateDirectorRequest, CreateVclTemplateBlockRequest, Director,
    DirectorRouter, UpdateVclTemplateRequest, VclTemplate, VclTemplateBlock,
};
use vaas_testkit::{HttpOrigin, HttpResponse, free_port, http_get, http_request};
use vaas_tests::{StoreKind, System, backend_for};

/// Hooks of every state, each appending its name to `X-Trail` (client side, in `req`) or
/// `X-Backend-Trail` (backend side, in `bereq`/`beresp`); the deliver hook shows the trail.
const TEMPLATE: &str = r#"<VCL/>

sub vcl_recv {
    set req.http.X-Trail = "recv";
    if (req.method == "PURGE") {
        return (purge);
    }
    if (req.url ~ "^/pass") {
        return (pass);
    }
    if (req.url ~ "^/pipe") {
        return (pipe);
    }
}

sub vcl_hash {
    set req.http.X-Trail = req.http.X-Trail + " hash";
}

sub vcl_hit {
    set req.http.X-Trail = req.http.X-Trail + " hit";
}

sub vcl_miss {
    set req.http.X-Trail = req.http.X-Trail + " miss";
}

sub vcl_pass {
    set req.http.X-Trail = req.http.X-Trail + " pass";
}

sub vcl_pipe {
    set bereq.http.X-Trail = req.http.X-Trail + " pipe";
}

sub vcl_purge {
    set req.http.X-Trail = req.http.X-Trail + " purge";
}

sub vcl_deliver {
    set resp.http.X-Trail = req.http.X-Trail + " deliver";
}

sub vcl_backend_fetch {
    set bereq.http.X-Backend-Trail = "fetch";
}

sub vcl_backend_response {
    set beresp.http.X-Backend-Trail = bereq.http.X-Backend-Trail + " response";
}

sub vcl_backend_error {
    set beresp.http.X-Backend-Trail = bereq.http.X-Backend-Trail + " error";
}
"#;

/// The synth hook runs before the built-in `vcl_synth` (a block naming its own tag wraps the
/// built-in body), since that one ends with `return (deliver)`.
const SYNTH_BLOCK: &str = r#"sub vcl_synth {
    set resp.http.X-Trail = req.http.X-Trail + " synth";
}
<EMPTY_DIRECTOR_SYNTH/>"#;

fn trail(response: &HttpResponse) -> &str {
    response.header("x-trail").unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_of_the_state_machine_is_taken_by_one_request() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    let origin = HttpOrigin::start("origin").await?;
    let mut config = system.config();
    config
        .create_backend(CreateBackendRequest {
            backend: Some(backend_for(&setup, origin.addr())),
        })
        .await?;
    // A host-routed director (routed before path-routed ones) whose only origin refuses
    // connections.
    let broken = config
        .create_director(CreateDirectorRequest {
            director: Some(Director {
                name: "broken".into(),
                cluster_ids: vec![setup.cluster_id],
                router: DirectorRouter::Domain as i32,
                route_expression: r"^broken\.example$".into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .director
        .context("director")?;
    let refused: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    config
        .create_backend(CreateBackendRequest {
            backend: Some(vaas_proto::v1::Backend {
                director_id: broken.id,
                ..backend_for(&setup, refused)
            }),
        })
        .await?;
    config
        .create_vcl_template_block(CreateVclTemplateBlockRequest {
            vcl_template_block: Some(VclTemplateBlock {
                template_id: setup.template_id,
                tag: "EMPTY_DIRECTOR_SYNTH".into(),
                content: SYNTH_BLOCK.into(),
                ..Default::default()
            }),
        })
        .await?;
    config
        .update_vcl_template(UpdateVclTemplateRequest {
            vcl_template: Some(VclTemplate {
                id: setup.template_id,
                name: "default".into(),
                content: TEMPLATE.into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await?;
    let varnish = system.varnishd(0).http_addr();
    let host = "demo.example";

    // miss: recv → hash → miss → backend fetch → backend response → deliver.
    let miss = http_get(varnish, "/page", host).await?;
    assert_eq!(miss.status, 200, "{miss:?}");
    assert_eq!(trail(&miss), "recv hash miss deliver");
    assert_eq!(miss.header("x-backend-trail"), Some("fetch response"));
    assert_eq!(origin.requests(), 1);

    // hit: recv → hash → hit → deliver, and the origin is not asked.
    let hit = http_get(varnish, "/page", host).await?;
    assert_eq!(trail(&hit), "recv hash hit deliver");
    assert_eq!(hit.body, "origin origin");
    assert_eq!(origin.requests(), 1);

    // purge: recv → hash → purge → synth; the next request misses again.
    let purge = http_request(varnish, "PURGE", "/page", host, &[]).await?;
    assert_eq!(purge.status, 200, "{purge:?}");
    assert_eq!(trail(&purge), "recv hash purge synth");
    let after_purge = http_get(varnish, "/page", host).await?;
    assert_eq!(trail(&after_purge), "recv hash miss deliver");
    assert_eq!(origin.requests(), 2);

    // pass: recv → hash → pass → backend fetch → backend response → deliver; never cached.
    for round in 1..=2 {
        let pass = http_get(varnish, "/pass", host).await?;
        assert_eq!(trail(&pass), "recv hash pass deliver", "round {round}");
        assert_eq!(pass.header("x-backend-trail"), Some("fetch response"));
    }
    assert_eq!(origin.requests(), 4, "both passes reached the origin");

    // pipe: recv → hash → pipe; varnishd only relays bytes, so the response is the origin's own (no
    // deliver, no VaaS header) and the trail comes back as the origin's echo of the request.
    let pipe = http_get(varnish, "/pipe", host).await?;
    assert_eq!(pipe.status, 200, "{pipe:?}");
    assert_eq!(pipe.header("x-echo-trail"), Some("recv hash pipe"));
    assert_eq!(pipe.header("x-trail"), None);
    assert_eq!(pipe.header("x-vaas-vcl-version"), None);
    assert_eq!(origin.requests(), 5);

    // synth: the status endpoint answers from VaaS's vcl_recv (before the template's, so no
    // "recv" in the trail) → hash → synth, without the origin.
    let synth = http_get(varnish, "/vaas_status", host).await?;
    assert_eq!(synth.status, 200, "{synth:?}");
    assert_eq!(trail(&synth).trim(), "hash synth");
    assert_eq!(origin.requests(), 5);

    // backend error: the origin refuses, backend fetch → backend error → 503.
    let error = http_get(varnish, "/", "broken.example").await?;
    assert_eq!(error.status, 503, "{error:?}");
    assert_eq!(error.header("x-backend-trail"), Some("fetch error"));
    assert_eq!(trail(&error), "recv hash miss deliver");
    system.ensure_running()
}
