//! The device event loop: one thread that owns every device's event handlers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{Filters, SeccompError, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot start the device event loop")]
    Start(#[source] std::io::Error),
    #[error("device event loop")]
    Seccomp(#[source] SeccompError),
}

pub type DeviceEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Ends the loop when its eventfd is written.
struct StopSubscriber {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the event loop's stop eventfd: {e:?}");
        }
    }
}

pub struct DeviceLoop {
    stop_evt: EventFd,
    thread: JoinHandle<()>,
}

impl DeviceLoop {
    /// Starts the loop's thread, under its seccomp filter when `filters` are given.
    pub fn start(
        mut manager: DeviceEventManager,
        filters: Option<Arc<Filters>>,
    ) -> Result<Self, EventLoopError> {
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Start)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(StopSubscriber {
            evt: stop_evt.try_clone().map_err(EventLoopError::Start)?,
            stopped: stopped.clone(),
        })));
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
                while !stopped.load(Ordering::Acquire) {
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
        Ok(DeviceLoop { stop_evt, thread })
    }

    pub fn stop(self) {
        if let Err(e) = self.stop_evt.write(1) {
            log::error!("cannot stop the device event loop: {e}");
            return;
        }
        if self.thread.join().is_err() {
            log::error!("the device event loop panicked");
        }
    }
}
