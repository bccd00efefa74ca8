//! Where vCPU threads wait while the VM is paused: each checks the gate before it enters the
//! guest; the main thread closes it, kicks the vCPUs out of KVM_RUN and waits until every one
//! is parked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct PauseGate {
    /// `state.closed`, readable without the lock: an open gate costs a vCPU exit one load.
    closed: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// vCPU threads waiting at the gate.
    parked: usize,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU side: returns at once when open, else waits until it opens.
    pub fn pass(&self) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        if !state.closed {
            return;
        }
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
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
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
        let gate = Arc::new(PauseGate::default());
        gate.pass();
        gate.close();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.pass())
            })
            .collect();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        assert!(!gate.wait_parked(4, Duration::from_millis(20)));
        assert!(threads.iter().all(|t| !t.is_finished()));
        gate.open();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(!gate.is_closed());
        assert!(gate.wait_parked(0, Duration::ZERO));
    }
}
