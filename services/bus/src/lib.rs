//! The NATS side of VaaS, shared by vaas-api and vaas-scheduler: subject names, the JetStream
//! stream of reload intents, and the formats of the messages on them.
//!
//! Intents go through JetStream (stream [`INTENTS_STREAM`], one subject per cluster, only the
//! newest message of each subject kept, message id = task id so that a re-publish is a
//! duplicate). Task events are plain NATS messages: a hint to re-read the task from the store,
//! which stays the source of truth, so a lost event delays a watcher but never misleads it.
//! Services authenticate with a user and a password read from a file ([`NatsAuth`]).
//! NATS only speeds things up: the services start and keep working while it is away, and
//! whoever finds the stream missing creates it again. This crate knows nothing of the store or
//! of gRPC.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

/// Name of the JetStream stream that holds reload intents.
pub const INTENTS_STREAM: &str = "VAAS_INTENTS";

/// Subject filter matching every cluster's intent subject.
pub const INTENT_SUBJECTS: &str = "vaas.intents.*";

/// How long JetStream remembers message ids to drop re-published intents.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Time allowed to connect to NATS and for each JetStream request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest pause between two attempts to reach a NATS that went away, so that the services
/// are back on it about as soon as it is.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How long publishing an event may wait for a NATS that is away.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(1);

/// Returns the subject of one cluster's reload intents.
pub fn intent_subject(cluster_id: i64) -> String {
    format!("vaas.intents.{cluster_id}")
}

/// Returns the subject on which state changes of one task are announced.
pub fn task_event_subject(task_id: i64) -> String {
    format!("vaas.task_events.{task_id}")
}

/// Returns the subject on which changes of one cluster's reload progress are announced.
pub fn cluster_event_subject(cluster_id: i64) -> String {
    format!("vaas.cluster_events.{cluster_id}")
}

/// A reload intent: the cluster has a change up to `timestamp` that it does not serve yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The cluster to reload.
    pub cluster_id: i64,
    /// The task that carries the change.
    pub task_id: i64,
    /// The task's store timestamp (microseconds).
    pub timestamp: i64,
}

/// Announces that a task changed state; receivers re-read the task from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task that changed.
    pub task_id: i64,
    /// Its new state (`vaas.v1.TaskState` number).
    pub state: i32,
}

/// What can go wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to the NATS server.
    #[error("cannot connect to nats")]
    Connect(#[from] async_nats::ConnectError),
    /// Could not create or look up the intents stream.
    #[error("cannot set up the jetstream stream {INTENTS_STREAM}")]
    Stream(#[from] jetstream::context::CreateStreamError),
    /// Publishing an intent failed or was not acknowledged.
    #[error("cannot publish to jetstream")]
    Publish(#[from] jetstream::context::PublishError),
    /// Publishing a core NATS message failed.
    #[error("cannot publish to nats")]
    CorePublish(#[from] async_nats::PublishError),
    /// NATS did not take a message in time (it is away and the client's buffer is full).
    #[error("nats did not take the message within {EVENT_TIMEOUT:?}")]
    Timeout,
    /// A message could not be encoded or decoded.
    #[error("malformed message")]
    Format(#[from] serde_json::Error),
    /// The file named by `--nats-password-file` could not be read.
    #[error("cannot read --nats-password-file {}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The file named by `--nats-password-file` holds no password.
    #[error("--nats-password-file {} is empty", path.display())]
    EmptyPasswordFile {
        /// The file.
        path: PathBuf,
    },
    /// NATS refused the credentials, or a client without any.
    #[error("nats refused {}", refused_login(user.as_deref()))]
    Refused {
        /// The user that was refused; `None` for an anonymous connection.
        user: Option<String>,
        /// The server's answer.
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Describes a refused login for [`Error::Refused`].
fn refused_login(user: Option<&str>) -> String {
    match user {
        Some(user) => format!("user {user} with the password of --nats-password-file"),
        None => {
            "a client without credentials (set --nats-user and --nats-password-file)".to_owned()
        }
    }
}

impl Error {
    /// Returns whether the error comes from the configuration (a flag to fix) rather than from
    /// NATS itself.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Error::PasswordFile { .. } | Error::EmptyPasswordFile { .. } | Error::Refused { .. }
        )
    }
}

/// How a service authenticates to NATS: a user and a file holding its password, both or
/// neither (then the connection is anonymous).
///
/// Only the file's path is kept, so printing the configuration never shows the password.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NatsAuth {
    /// NATS user name; needs --nats-password-file [default: connect anonymously].
    #[arg(long, env = "VAAS_NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password (a trailing newline is ignored); needs --nats-user.
    #[arg(long, env = "VAAS_NATS_PASSWORD_FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
}

impl NatsAuth {
    /// Returns the user and the password read from the password file, or `None` when no user is
    /// configured.
    pub async fn credentials(&self) -> Result<Option<(String, String)>, Error> {
        let (Some(user), Some(path)) = (&self.nats_user, &self.nats_password_file) else {
            return Ok(None);
        };
        Ok(Some((user.clone(), read_password(path).await?)))
    }
}

/// Reads a password file: its content without the trailing line break; empty is an error.
async fn read_password(path: &Path) -> Result<String, Error> {
    let content = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| Error::PasswordFile {
            path: path.to_owned(),
            source,
        })?;
    let password = content.strip_suffix('\n').unwrap_or(&content);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(Error::EmptyPasswordFile {
            path: path.to_owned(),
        });
    }
    Ok(password.to_owned())
}

/// Connects to NATS at `url` with bounded timeouts, as the user of `auth` when it names one,
/// and returns the client and its JetStream.
///
/// A server that cannot be reached yet is retried in the background (the call returns without
/// waiting for it), but one that refuses the credentials fails the call at once: retrying would
/// not help. A lost connection is retried at most [`MAX_RECONNECT_DELAY`] apart, forever.
pub async fn connect(
    url: &str,
    name: &str,
    auth: &NatsAuth,
) -> Result<(async_nats::Client, jetstream::Context), Error> {
    let credentials = auth.credentials().await?;
    let user = credentials.as_ref().map(|(user, _)| user.clone());
    let options = match credentials {
        Some((user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        None => async_nats::ConnectOptions::new(),
    };
    let options = options
        .name(name)
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .reconnect_delay_callback(reconnect_delay);
    let client = match options.clone().connect(url).await {
        Ok(client) => client,
        Err(error)
            if matches!(
                error.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            ) =>
        {
            return Err(Error::Refused {
                user,
                source: error,
            });
        }
        // NATS may start after the service.
        Err(_) => options.retry_on_initial_connect().connect(url).await?,
    };
    let jetstream = jetstream::new(client.clone());
    Ok((client, jetstream))
}

/// Returns the pause before reconnection attempt `attempts`: doubling from 10 ms, at most
/// [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    let doublings = u32::try_from(attempts).unwrap_or(u32::MAX).min(10);
    Duration::from_millis(10 * 2u64.pow(doublings)).min(MAX_RECONNECT_DELAY)
}

/// Creates the intents stream if it does not exist yet (NATS may have restarted without its
/// data) and returns it.
pub async fn intents_stream(jetstream: &jetstream::Context) -> Result<stream::Stream, Error> {
    let stream = jetstream
        .get_or_create_stream(stream::Config {
            name: INTENTS_STREAM.to_owned(),
            subjects: vec![INTENT_SUBJECTS.to_owned()],
            // Only the newest intent of a cluster matters: it covers every older one.
            max_messages_per_subject: 1,
            duplicate_window: DUPLICATE_WINDOW,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    Ok(stream)
}

/// Publishes an intent and waits for JetStream to store it; a re-publish of the same task is
/// acknowledged as a duplicate.
pub async fn publish_intent(jetstream: &jetstream::Context, intent: &Intent) -> Result<(), Error> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        intent.task_id.to_string().as_str(),
    );
    let payload = serde_json::to_vec(intent)?;
    jetstream
        .publish_with_headers(intent_subject(intent.cluster_id), headers, payload.into())
        .await?
        .await?;
    Ok(())
}

/// Announces a task's new state to watchers; gives up after [`EVENT_TIMEOUT`].
pub async fn publish_task_event(
    client: &async_nats::Client,
    event: &TaskEvent,
) -> Result<(), Error> {
    let payload = serde_json::to_vec(event)?;
    tokio::time::timeout(
        EVENT_TIMEOUT,
        client.publish(task_event_subject(event.task_id), payload.into()),
    )
    .await
    .map_err(|_| Error::Timeout)??;
    Ok(())
}

/// Announces that the reload progress of a cluster's servers changed; receivers re-read it from
/// the store. Gives up after [`EVENT_TIMEOUT`] so that a NATS outage never holds up a reload.
pub async fn publish_cluster_event(
    client: &async_nats::Client,
    cluster_id: i64,
) -> Result<(), Error> {
    tokio::time::timeout(
        EVENT_TIMEOUT,
        client.publish(cluster_event_subject(cluster_id), Vec::new().into()),
    )
    .await
    .map_err(|_| Error::Timeout)??;
    Ok(())
}

/// Decodes a message payload of this crate's formats.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, Error> {
    Ok(serde_json::from_slice(payload)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vaas_testkit::Nats;

    use super::{Error, NatsAuth, connect};

    fn auth(user: Option<&str>, password_file: Option<std::path::PathBuf>) -> NatsAuth {
        NatsAuth {
            nats_user: user.map(str::to_owned),
            nats_password_file: password_file,
        }
    }

    #[tokio::test]
    async fn without_a_user_the_connection_is_anonymous() -> anyhow::Result<()> {
        assert_eq!(NatsAuth::default().credentials().await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn the_password_is_the_file_without_its_trailing_line_break() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("password");
        for (content, expected) in [
            ("s3cr3t\n", "s3cr3t"),
            ("s3cr3t\r\n", "s3cr3t"),
            ("s3cr3t", "s3cr3t"),
            (" spaced out \n", " spaced out "),
        ] {
            std::fs::write(&path, content)?;
            let credentials = auth(Some("vaas"), Some(path.clone())).credentials().await?;
            assert_eq!(
                credentials,
                Some(("vaas".to_owned(), expected.to_owned())),
                "{content:?}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_or_empty_password_file_is_a_configuration_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("missing");
        let error = auth(Some("vaas"), Some(missing.clone()))
            .credentials()
            .await
            .expect_err("a missing file");
        assert!(error.is_configuration());
        assert_eq!(
            error.to_string(),
            format!("cannot read --nats-password-file {}", missing.display())
        );
        assert!(matches!(error, Error::PasswordFile { .. }));

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n")?;
        let error = auth(Some("vaas"), Some(empty.clone()))
            .credentials()
            .await
            .expect_err("an empty file");
        assert!(error.is_configuration());
        assert_eq!(
            error.to_string(),
            format!("--nats-password-file {} is empty", empty.display())
        );
        Ok(())
    }

    #[tokio::test]
    async fn connects_with_the_password_and_fails_at_once_without_it() -> anyhow::Result<()> {
        let nats = Nats::start().await?;
        let right = auth(Some(nats.user()), Some(nats.password_file()));
        let (client, _) = connect(&nats.url(), "test", &right).await?;
        client.flush().await?;

        let dir = tempfile::tempdir()?;
        let wrong_file = dir.path().join("wrong");
        std::fs::write(&wrong_file, "wrong\n")?;
        for refused in [
            NatsAuth::default(),
            auth(Some(nats.user()), Some(wrong_file)),
        ] {
            // An error, not a client that keeps retrying in the background.
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                connect(&nats.url(), "test", &refused),
            )
            .await?;
            let Err(error @ Error::Refused { .. }) = attempt else {
                panic!("{refused:?} must be refused, got {attempt:?}");
            };
            assert!(error.is_configuration());
            let expected = match refused.nats_user {
                Some(_) => "nats refused user vaas with the password of --nats-password-file",
                None => {
                    "nats refused a client without credentials (set --nats-user and \
                     --nats-password-file)"
                }
            };
            assert_eq!(error.to_string(), expected);
        }
        Ok(())
    }

    #[tokio::test]
    async fn an_unreachable_nats_does_not_hold_up_the_caller() -> anyhow::Result<()> {
        // A port nobody listens on: the client keeps trying in the background.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let (client, _) = tokio::time::timeout(
            Duration::from_secs(3),
            connect(
                &format!("nats://127.0.0.1:{port}"),
                "test",
                &NatsAuth::default(),
            ),
        )
        .await??;
        assert_ne!(
            client.connection_state(),
            async_nats::connection::State::Connected
        );
        Ok(())
    }

    #[test]
    fn reconnection_attempts_are_soon_and_at_most_a_second_apart() {
        let delays: Vec<_> = (0..40).map(super::reconnect_delay).collect();
        assert_eq!(delays[0], Duration::from_millis(10));
        assert!(delays.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(delays[39], super::MAX_RECONNECT_DELAY);
    }

    #[test]
    fn the_user_and_the_password_file_come_together() {
        use clap::Parser;

        #[derive(Debug, Parser)]
        struct Flags {
            #[command(flatten)]
            auth: NatsAuth,
        }

        let both = Flags::try_parse_from([
            "test",
            "--nats-user",
            "vaas",
            "--nats-password-file",
            "/run/nats-password",
        ]);
        assert!(both.is_ok(), "{both:?}");
        assert!(Flags::try_parse_from(["test"]).is_ok());
        let user_only = Flags::try_parse_from(["test", "--nats-user", "vaas"]);
        assert!(user_only.is_err(), "{user_only:?}");
        let file_only = Flags::try_parse_from(["test", "--nats-password-file", "/p"]);
        assert!(file_only.is_err(), "{file_only:?}");
    }
}
