//! Security of the bus, as an attacker who reaches NATS would try it: without the user and
//! password that vaas-api and vaas-scheduler log in with, a client cannot connect, so it can
//! neither read nor overwrite the reload intents (stream `VAAS_INTENTS`) or the scheduler's
//! leader lease (bucket `VAAS_SCHEDULER_LEADER`).

use anyhow::{Context, Result};
use async_nats::{ConnectErrorKind, ConnectOptions};
use vaas_tests::{StoreKind, System};

/// The stream of reload intents (`vaas_bus::INTENTS_STREAM`).
const INTENTS_STREAM: &str = "VAAS_INTENTS";
/// The bucket of the scheduler leader's lease (`vaas_bus::LEADER_BUCKET`).
const LEADER_BUCKET: &str = "VAAS_SCHEDULER_LEADER";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_services_password_a_client_reaches_neither_intents_nor_lease() -> Result<()> {
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

    // The same server lets the services' user in, with the lease and the intents there to take:
    // the refusals above are about credentials, not about a server that is down or empty.
    let client = ConnectOptions::with_user_and_password(nats.user().into(), nats.password().into())
        .connect(nats.url())
        .await?;
    let jetstream = async_nats::jetstream::new(client);
    let lease = jetstream.get_key_value(LEADER_BUCKET).await?;
    let leader = lease.get("leader").await?.context("no leader lease")?;
    assert_eq!(&leader[..], b"scheduler-0");
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
