//! [`EngineCell`]: the node's current engine. A snapshot installed on a running node replaces
//! the engine (a new directory opened from the snapshot); holders read the cell each time and
//! watch [`EngineCell::changes`] to re-subscribe.

use std::sync::{Arc, OnceLock, RwLock};

use chatlog::engine::{Engine, Proposer};
use tokio::sync::watch;

/// The current engine of a node.
pub struct EngineCell {
    current: RwLock<Arc<Engine>>,
    generation: watch::Sender<u64>,
    proposer: OnceLock<Arc<dyn Proposer>>,
}

impl std::fmt::Debug for EngineCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCell")
            .field("generation", &*self.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl EngineCell {
    /// A cell holding `engine`.
    pub fn new(engine: Arc<Engine>) -> Arc<EngineCell> {
        Arc::new(EngineCell {
            current: RwLock::new(engine),
            generation: watch::channel(0).0,
            proposer: OnceLock::new(),
        })
    }

    /// The current engine.
    pub fn get(&self) -> Arc<Engine> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ticks each time the engine is replaced.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Routes writes of this engine and of every later one through `proposer`.
    pub fn set_proposer(&self, proposer: Arc<dyn Proposer>) {
        self.get().set_proposer(proposer.clone());
        let _ = self.proposer.set(proposer);
    }

    /// Runs `work` on the current engine and, each time the engine is replaced, drops that
    /// run and starts `work` again on the new engine, calling `on_replaced` in between.
    /// Returns once a run ends by itself with no replacement pending (the engine closed), or
    /// once the cell is gone.
    pub async fn follow<F, Fut>(&self, mut work: F, mut on_replaced: impl FnMut())
    where
        F: FnMut(Arc<Engine>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut changes = self.changes();
        loop {
            changes.borrow_and_update();
            tokio::select! {
                () = work(self.get()) => {
                    if !changes.has_changed().unwrap_or(false) {
                        return;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            on_replaced();
        }
    }

    /// Replaces the engine; returns the old one.
    pub fn replace(&self, engine: Arc<Engine>) -> Arc<Engine> {
        if let Some(p) = self.proposer.get() {
            engine.set_proposer(p.clone());
        }
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            engine,
        );
        self.generation.send_modify(|g| *g += 1);
        old
    }
}
