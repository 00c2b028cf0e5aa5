//! NATS is an accelerator, not a dependency: while it is down the scheduler keeps leading (the
//! lease is in the store), keeps serving its agents and finds work in the store, so an outage of
//! N seconds delays a reload by about N seconds at most; a NATS that comes back without its data
//! gets its stream and consumer back; and a scheduler starts while NATS is down.
//!
//! Delays are measured from the answer to an asynchronous write to the moment GetTask reports
//! the task finished, and printed; the bounds asserted are the ones the issue states (10 s).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use async_nats::ConnectOptions;
use vaas_proto::v1::{CreateBackendRequest, Task, TaskState};
use vaas_testkit::{HttpOrigin, http_get};
use vaas_tests::{Setup, StoreKind, System, backend_for, on_both_stores};

on_both_stores!(
    a_five_second_nats_outage_delays_a_reload_by_less_than_ten_seconds_and_keeps_the_leader,
    a_nats_restarted_without_its_data_gets_its_stream_back_and_reloads_go_on,
    a_scheduler_started_while_nats_is_down_leads_serves_agents_and_reloads,
);

/// The longest a reload may take after a write while NATS is down or just came back.
const BOUND: Duration = Duration::from_secs(10);

/// The log line of a scheduler replica that takes the leader lease.
const LEADING: &str = "leading: this replica drives reloads";

/// The stream of reload intents (`vaas_bus::INTENTS_STREAM`).
const INTENTS_STREAM: &str = "VAAS_INTENTS";

/// The scheduler's durable consumer of intents (`vaas_scheduler::CONSUMER_NAME`).
const CONSUMER_NAME: &str = "vaas-scheduler";

/// Adds a backend pointing at `origin` with an asynchronous write; returns its task's id and
/// when the answer came.
async fn write_async(
    system: &System,
    setup: &Setup,
    origin: &HttpOrigin,
) -> Result<(i64, Instant)> {
    let request = vaas_tests::respond_async(CreateBackendRequest {
        backend: Some(backend_for(setup, origin.addr())),
    });
    let created = system.config().create_backend(request).await?.into_inner();
    let answered = Instant::now();
    let task = created.tasks.first().context("the write made no task")?;
    Ok((task.id, answered))
}

/// Polls the task every 100 ms until it is finished (SUCCESS or FAILURE) or `until`; returns it
/// and how long after `since` it was seen finished.
async fn poll_finished(
    system: &System,
    task_id: i64,
    since: Instant,
    until: Instant,
) -> Result<Option<(Task, Duration)>> {
    loop {
        let task = system.task(task_id).await?;
        let finished = [TaskState::Success as i32, TaskState::Failure as i32];
        if finished.contains(&task.state) {
            return Ok(Some((task, since.elapsed())));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the task once it is finished and how long after the write (`written`) it was seen
/// so; fails unless that is within [`BOUND`].
async fn finished_within_bound(
    system: &System,
    task_id: i64,
    written: Instant,
) -> Result<(Task, Duration)> {
    poll_finished(system, task_id, written, written + BOUND)
        .await?
        .with_context(|| format!("task {task_id} not finished {BOUND:?} after the write"))
}

/// Fails unless varnishd serves `origin` among the backends of the director.
async fn serves(system: &System, origin: &HttpOrigin) -> Result<()> {
    let mut origins_seen = std::collections::BTreeSet::new();
    for request in 0..6 {
        // Distinct URLs: a cached answer would not show which backend serves.
        let path = format!("/{}/{request}", origin.name());
        let response = http_get(system.varnishd(0).http_addr(), &path, "demo.example").await?;
        origins_seen.insert(response.header("x-origin").unwrap_or_default().to_owned());
    }
    ensure!(
        origins_seen.contains(origin.name()),
        "varnishd serves {origins_seen:?}, not {}",
        origin.name()
    );
    Ok(())
}

async fn a_five_second_nats_outage_delays_a_reload_by_less_than_ten_seconds_and_keeps_the_leader(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;
    let during = HttpOrigin::start("origin-during-outage").await?;

    system.nats_mut().stop();
    let stopped = Instant::now();
    let (task_id, written) = write_async(&system, &setup, &during).await?;
    // The outage lasts 5 s whatever the reload does meanwhile.
    let outage_end = stopped + Duration::from_secs(5);
    let during_outage = poll_finished(&system, task_id, written, outage_end).await?;
    tokio::time::sleep_until(outage_end.into()).await;
    system.nats_mut().start_again(false).await?;
    let (task, delay) = match during_outage {
        Some(finished) => finished,
        None => finished_within_bound(&system, task_id, written).await?,
    };
    println!("a write during a 5 s NATS outage finished {delay:?} after it was answered");
    assert!(delay < BOUND, "{delay:?}");
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    serves(&system, &during).await?;

    // Once NATS is back, intents flow again.
    let after = HttpOrigin::start("origin-after-outage").await?;
    let (task_id, written) = write_async(&system, &setup, &after).await?;
    let (task, delay) = finished_within_bound(&system, task_id, written).await?;
    println!("a write after the outage finished {delay:?} after it was answered");
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    serves(&system, &after).await?;

    let log = system.scheduler_log();
    assert_eq!(
        log.matches(LEADING).count(),
        1,
        "the scheduler kept leading through the outage:\n{log}"
    );
    system.ensure_running()
}

async fn a_nats_restarted_without_its_data_gets_its_stream_back_and_reloads_go_on(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;

    system.nats_mut().stop();
    system.nats_mut().start_again(true).await?;
    let origin = HttpOrigin::start("origin-after-wipe").await?;
    let (task_id, written) = write_async(&system, &setup, &origin).await?;
    let (task, delay) = finished_within_bound(&system, task_id, written).await?;
    println!("a write after NATS lost its data finished {delay:?} after it was answered");
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    serves(&system, &origin).await?;

    // The intent went through a stream created again, read by a consumer created again.
    let nats = system.nats();
    let client = ConnectOptions::with_user_and_password(nats.user().into(), nats.password().into())
        .connect(nats.url())
        .await?;
    let jetstream = async_nats::jetstream::new(client);
    let intents = jetstream.get_stream(INTENTS_STREAM).await?;
    let deadline = Instant::now() + BOUND;
    let subject = format!("vaas.intents.{}", setup.cluster_id);
    let this_task = format!("\"task_id\":{task_id},");
    loop {
        let newest = intents.get_last_raw_message_by_subject(&subject).await;
        let published = newest.as_ref().is_ok_and(|message| {
            std::str::from_utf8(&message.payload).is_ok_and(|intent| intent.contains(&this_task))
        });
        if published {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the relay did not publish task {task_id}'s intent: {newest:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Err(error) = intents.consumer_info(CONSUMER_NAME).await {
        ensure!(
            Instant::now() < deadline,
            "the scheduler's consumer was not created again: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = system.scheduler_log();
    assert_eq!(log.matches(LEADING).count(), 1, "{log}");
    system.ensure_running()
}

async fn a_scheduler_started_while_nats_is_down_leads_serves_agents_and_reloads(
    store: StoreKind,
) -> Result<()> {
    let mut system = System::builder(store).start().await?;
    let setup = system.set_up().await?;

    system.nats_mut().stop();
    // Waits until the new scheduler leads and the agent attached to it.
    let restarting = Instant::now();
    system.restart_scheduler(0).await?;
    println!(
        "with NATS down, the scheduler led and its agent attached {:?} after the restart began",
        restarting.elapsed()
    );
    let without_nats = HttpOrigin::start("origin-without-nats").await?;
    let (task_id, written) = write_async(&system, &setup, &without_nats).await?;
    let (task, delay) = finished_within_bound(&system, task_id, written).await?;
    println!("a write with NATS down finished {delay:?} after it was answered");
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    serves(&system, &without_nats).await?;

    system.nats_mut().start_again(false).await?;
    system
        .wait_for_scheduler_log("reading reload intents")
        .await?;
    let with_nats = HttpOrigin::start("origin-with-nats-back").await?;
    let (task_id, written) = write_async(&system, &setup, &with_nats).await?;
    let (task, delay) = finished_within_bound(&system, task_id, written).await?;
    println!("a write after NATS came back finished {delay:?} after it was answered");
    assert_eq!(task.state, TaskState::Success as i32, "{task:?}");
    serves(&system, &with_nats).await?;
    system.ensure_running()
}
