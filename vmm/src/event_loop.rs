//! The device event loop: one thread that owns every device's event handlers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vstate::pause::PauseGate;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot start the device event loop")]
    Start(#[source] std::io::Error),
    #[error("device event loop")]
    Seccomp(#[source] SeccompError),
}

pub type DeviceEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Wakes the loop when its eventfd is written, to look at its stop flag and hold gate.
struct WakeSubscriber {
    evt: EventFd,
}

impl MutEventSubscriber for WakeSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the event loop's wake eventfd: {e:?}");
        }
    }
}

pub struct DeviceLoop {
    wake_evt: EventFd,
    stopped: Arc<AtomicBool>,
    /// Closed while a snapshot reads the devices and guest memory: the loop waits there.
    hold: Arc<PauseGate<()>>,
    thread: JoinHandle<()>,
}

impl DeviceLoop {
    /// Starts the loop's thread, under its seccomp filter when `filters` are given.
    pub fn start(
        mut manager: DeviceEventManager,
        filters: Option<Arc<Filters>>,
    ) -> Result<Self, EventLoopError> {
        let wake_evt = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Start)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(PauseGate::<()>::default());
        manager.add_subscriber(Arc::new(Mutex::new(WakeSubscriber {
            evt: wake_evt.try_clone().map_err(EventLoopError::Start)?,
        })));
        let (stop_flag, gate) = (stopped.clone(), hold.clone());
        let (ready_tx, ready) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                let applied = filters.map_or(Ok(()), |f| f.apply(ThreadKind::Devices));
                let failed = applied.is_err();
                let _ = ready_tx.send(applied);
                if failed {
                    return;
                }
                while !stop_flag.load(Ordering::Acquire) {
                    gate.pass(0, || ());
                    if let Err(e) = manager.run() {
                        log::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Start)?;
        // The thread always answers before it can end.
        if let Ok(Err(e)) = ready.recv() {
            let _ = thread.join();
            return Err(EventLoopError::Seccomp(e));
        }
        Ok(DeviceLoop {
            wake_evt,
            stopped,
            hold,
            thread,
        })
    }

    /// Stops the loop between two rounds of events; true once it waits, within `timeout`.
    pub fn hold(&self, timeout: Duration) -> bool {
        self.hold.close();
        if let Err(e) = self.wake_evt.write(1) {
            log::error!("cannot wake the device event loop: {e}");
        }
        if self.hold.wait_parked(1, timeout) {
            return true;
        }
        self.hold.open();
        false
    }

    /// Lets a held loop go on.
    pub fn release(&self) {
        self.hold.open();
    }

    pub fn stop(self) {
        self.stopped.store(true, Ordering::Release);
        self.hold.open();
        if let Err(e) = self.wake_evt.write(1) {
            log::error!("cannot stop the device event loop: {e}");
            return;
        }
        if self.thread.join().is_err() {
            log::error!("the device event loop panicked");
        }
    }
}
