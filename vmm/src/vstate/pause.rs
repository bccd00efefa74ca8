//! Where vCPU threads wait while the VM is paused: each checks the gate before it enters the
//! guest; the main thread closes it, kicks the vCPUs out of KVM_RUN and waits until every one
//! is parked. Each vCPU saves its state as it parks (`S`, for a snapshot of the paused VM).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::vstate::vcpu_state::VcpuState;

pub struct PauseGate<S = Result<VcpuState, String>> {
    /// `state.closed`, readable without the lock: an open gate costs a vCPU exit one load.
    closed: AtomicBool,
    state: Mutex<GateState<S>>,
    changed: Condvar,
}

impl<S> Default for PauseGate<S> {
    fn default() -> Self {
        Self {
            closed: AtomicBool::new(false),
            state: Mutex::new(GateState {
                closed: false,
                parked: 0,
                saved: BTreeMap::new(),
            }),
            changed: Condvar::new(),
        }
    }
}

struct GateState<S> {
    closed: bool,
    /// vCPU threads waiting at the gate.
    parked: usize,
    /// What each parked vCPU saved, by vCPU id; emptied when the gate opens.
    saved: BTreeMap<u8, S>,
}

impl<S: Clone> PauseGate<S> {
    fn lock(&self) -> MutexGuard<'_, GateState<S>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU side: returns at once when open, else saves with `save` and waits until it opens.
    pub fn pass(&self, id: u8, save: impl FnOnce() -> S) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let saved = save();
        let mut state = self.lock();
        if !state.closed {
            return;
        }
        state.saved.insert(id, saved);
        state.parked += 1;
        self.changed.notify_all();
        while state.closed {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.closed.store(true, Ordering::Release);
    }

    pub fn open(&self) {
        let mut state = self.lock();
        state.closed = false;
        state.saved.clear();
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// What the parked vCPUs saved, in id order.
    pub fn saved(&self) -> Vec<S> {
        self.lock().saved.values().cloned().collect()
    }

    /// Waits up to `timeout` for `count` threads to be parked; true once they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.parked < count {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn threads_park_at_a_closed_gate_until_it_opens() {
        let gate = Arc::new(PauseGate::<u8>::default());
        gate.pass(9, || unreachable!("an open gate saves nothing"));
        gate.close();
        let threads: Vec<_> = (0..3)
            .map(|id| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.pass(id, || id * 10))
            })
            .collect();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        assert_eq!(gate.saved(), [0, 10, 20]);
        assert!(!gate.wait_parked(4, Duration::from_millis(20)));
        assert!(threads.iter().all(|t| !t.is_finished()));
        gate.open();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(!gate.is_closed());
        assert!(gate.saved().is_empty());
        assert!(gate.wait_parked(0, Duration::ZERO));
    }
}
