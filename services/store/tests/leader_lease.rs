//! The scheduler leader's lease, against both SQLite and a real PostgreSQL server: one holder at
//! a time, a higher term at every hand-over, expiry on the database's clock, release.

use std::time::Duration;

use anyhow::Result;
use vaas_store::Store;

/// A store that lives as long as its database.
struct Fixture {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<vaas_testkit::Postgres>,
}

async fn sqlite() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("vaas.db").display());
    Ok(Fixture {
        store: Store::connect(&url).await?,
        _dir: Some(dir),
        _postgres: None,
    })
}

async fn postgres() -> Result<Fixture> {
    let postgres = vaas_testkit::Postgres::start().await?;
    Ok(Fixture {
        store: Store::connect(&postgres.url()).await?,
        _dir: None,
        _postgres: Some(postgres),
    })
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let fixture = super::sqlite().await?;
                super::$name(&fixture.store).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                let fixture = super::postgres().await?;
                super::$name(&fixture.store).await
            })*
        }
    };
}

on_both_stores!(
    replicas_racing_for_the_lease_get_exactly_one_holder,
    a_held_lease_is_neither_taken_nor_renewed_by_another_replica,
    an_expired_lease_goes_to_the_next_replica_with_a_higher_term,
    a_renewed_lease_outlives_its_first_time_to_live,
    a_released_lease_is_taken_at_once_and_the_term_still_grows,
);

const LONG: Duration = Duration::from_secs(60);

async fn replicas_racing_for_the_lease_get_exactly_one_holder(store: &Store) -> Result<()> {
    let mut race = tokio::task::JoinSet::new();
    for replica in 0..8 {
        let store = store.clone();
        race.spawn(async move {
            let holder = format!("scheduler-{replica}");
            let term = store.acquire_leader_lease(&holder, LONG).await?;
            anyhow::Ok((holder, term))
        });
    }
    let mut winners = Vec::new();
    while let Some(outcome) = race.join_next().await {
        if let (holder, Some(term)) = outcome?? {
            winners.push((holder, term));
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (holder, term) = winners.remove(0);
    let lease = store.leader_lease().await?.expect("a holder");
    assert_eq!((lease.holder, lease.term), (holder, term));
    assert!(
        lease.expires_in > LONG - Duration::from_secs(10),
        "{:?}",
        lease.expires_in
    );
    Ok(())
}

async fn a_held_lease_is_neither_taken_nor_renewed_by_another_replica(store: &Store) -> Result<()> {
    let term = store
        .acquire_leader_lease("a", LONG)
        .await?
        .expect("a free lease");
    assert_eq!(store.acquire_leader_lease("b", LONG).await?, None);
    // A replica cannot take over its own lease either: a second process started with the same
    // replica id must wait like everyone else.
    assert_eq!(store.acquire_leader_lease("a", LONG).await?, None);
    assert!(!store.renew_leader_lease("b", term, LONG).await?);
    assert!(!store.release_leader_lease("b", term).await?);
    assert!(store.renew_leader_lease("a", term, LONG).await?);
    let lease = store.leader_lease().await?.expect("a holder");
    assert_eq!((lease.holder.as_str(), lease.term), ("a", term));
    Ok(())
}

async fn an_expired_lease_goes_to_the_next_replica_with_a_higher_term(store: &Store) -> Result<()> {
    let ttl = Duration::from_millis(300);
    let first = store
        .acquire_leader_lease("a", ttl)
        .await?
        .expect("a free lease");
    assert_eq!(store.acquire_leader_lease("b", LONG).await?, None);
    // Waiting is the point here: the lease runs out on the database's clock.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(store.leader_lease().await?, None, "expired");
    let second = store
        .acquire_leader_lease("b", LONG)
        .await?
        .expect("an expired lease");
    assert!(second > first, "term {second} after {first}");
    // The old leader cannot renew or release the lease it lost.
    assert!(!store.renew_leader_lease("a", first, LONG).await?);
    assert!(!store.release_leader_lease("a", first).await?);
    let lease = store.leader_lease().await?.expect("a holder");
    assert_eq!((lease.holder.as_str(), lease.term), ("b", second));
    Ok(())
}

async fn a_renewed_lease_outlives_its_first_time_to_live(store: &Store) -> Result<()> {
    let ttl = Duration::from_millis(300);
    let term = store
        .acquire_leader_lease("a", ttl)
        .await?
        .expect("a free lease");
    assert!(store.renew_leader_lease("a", term, LONG).await?);
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(store.acquire_leader_lease("b", LONG).await?, None);
    assert_eq!(
        store.leader_lease().await?.map(|lease| lease.term),
        Some(term)
    );

    // A lease that ran out but that nobody took is still its holder's to renew: nobody else
    // led in between, so the term stays.
    assert!(store.renew_leader_lease("a", term, ttl).await?);
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(store.renew_leader_lease("a", term, LONG).await?);
    assert_eq!(
        store.leader_lease().await?.map(|lease| lease.term),
        Some(term)
    );
    Ok(())
}

async fn a_released_lease_is_taken_at_once_and_the_term_still_grows(store: &Store) -> Result<()> {
    let first = store
        .acquire_leader_lease("a", LONG)
        .await?
        .expect("a free lease");
    assert!(store.release_leader_lease("a", first).await?);
    assert_eq!(store.leader_lease().await?, None);
    assert!(
        !store.renew_leader_lease("a", first, LONG).await?,
        "released"
    );
    let second = store
        .acquire_leader_lease("b", LONG)
        .await?
        .expect("a released lease");
    assert_eq!(second, first + 1);
    assert!(store.release_leader_lease("b", second).await?);
    let third = store
        .acquire_leader_lease("a", LONG)
        .await?
        .expect("a released lease");
    assert_eq!(third, second + 1, "a returning holder gets a new term too");
    Ok(())
}
