//! The harness keeps its promises: a failing test leaves no process and
//! no database behind, and nothing it waits for can hang the suite.

use std::{process::Command, time::Duration};

use crate::helpers::{Backend, bounded_by, fresh_database, output_within, scalar, spawn_binary, until};

once_tests!(
    a_failing_test_leaves_no_replica_running_and_no_database(postgres),
    a_test_past_its_limit_fails_naming_what_it_waited_for,
);

async fn a_failing_test_leaves_no_replica_running_and_no_database() {
    let Backend::Postgres(admin_url) = Backend::postgres() else { unreachable!() };
    let dir = tempfile::tempdir().unwrap();
    let (database_url, guard) = fresh_database(&Backend::postgres(), dir.path()).await;
    let name = database_url.rsplit('/').next().unwrap().to_owned();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let _database = guard;
        let replica = spawn_binary(&database_url, dir.path(), &[]);
        pid_tx.send(replica.pid()).unwrap();
        panic!("the test fails with a replica running");
    });
    assert!(failing.await.unwrap_err().is_panic());
    let pid = pid_rx.await.unwrap();
    // Killed and reaped: not even a zombie is left.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "keywarden (pid {pid}) is still there");
    let left =
        scalar(&admin_url, &format!("SELECT COUNT(*) FROM pg_database WHERE datname = '{name}'")).await;
    assert_eq!(left, 0, "database {name} was left behind");
}

async fn a_test_past_its_limit_fails_naming_what_it_waited_for() {
    let stuck = tokio::spawn(bounded_by(Duration::from_millis(300), "a stuck test", async {
        until("a condition that never holds", || async { None::<()> }).await;
    }));
    let panic = stuck.await.unwrap_err().into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("a stuck test ran past its limit")
            && message.contains("a condition that never holds"),
        "{message}"
    );

    let hung = std::thread::spawn(|| {
        output_within(Command::new("sleep").arg("30"), Duration::from_millis(300), "a command that hangs")
    });
    let panic = hung.join().unwrap_err();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("waited 300ms for a command that hangs; killed it"), "{message}");
}
