//! Security of the bus, as an attacker who reaches NATS would try it: without the user and
//! password that vaas-api and vaas-scheduler log in with, a client cannot connect, so it can
//! neither read nor overwrite the reload intents (stream `VAAS_INTENTS`). (Who leads the
//! schedulers is in the store, not on the bus.)

use anyhow::Result;
use async_nats::{ConnectErrorKind, ConnectOptions};
use vaas_tests::{StoreKind, System};

/// The stream of reload intents (`vaas_bus::INTENTS_STREAM`).
const INTENTS_STREAM: &str = "VAAS_INTENTS";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_services_password_a_client_cannot_reach_the_intents() -> Result<()> {
    let mut system = System::builder(StoreKind::Sqlite).start().await?;
    let setup = system.set_up().await?;
    let nats = system.nats();

    let anonymous = async_nats::connect(nats.url()).await;
    let refused = anonymous.expect_err("NATS must refuse a client without credentials");
    assert_eq!(refused.kind(), ConnectErrorKind::AuthorizationViolation);

    for (user, password) in [
        (nats.user(), "not-the-password"),
        ("admin", nats.password()),
    ] {
        let guessed = ConnectOptions::with_user_and_password(user.into(), password.into())
            .connect(nats.url())
            .await;
        let refused = guessed.expect_err("NATS must refuse a wrong user or password");
        assert_eq!(
            refused.kind(),
            ConnectErrorKind::AuthorizationViolation,
            "user {user}"
        );
    }

    // The same server lets the services' user in, with the intents there to take: the refusals
    // above are about credentials, not about a server that is down or empty.
    let client = ConnectOptions::with_user_and_password(nats.user().into(), nats.password().into())
        .connect(nats.url())
        .await?;
    let jetstream = async_nats::jetstream::new(client);
    let intents = jetstream.get_stream(INTENTS_STREAM).await?;
    let intent = intents
        .get_last_raw_message_by_subject(&format!("vaas.intents.{}", setup.cluster_id))
        .await?;
    let intent = std::str::from_utf8(&intent.payload)?;
    let cluster = format!("\"cluster_id\":{}", setup.cluster_id);
    assert!(intent.contains(&cluster), "{intent}");

    // The services, logged in, keep working.
    system.ensure_running()
}
