//! The device event loop: one thread that owns every device's event handlers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
    pub fn start(mut manager: DeviceEventManager) -> std::io::Result<Self> {
        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(StopSubscriber {
            evt: stop_evt.try_clone()?,
            stopped: stopped.clone(),
        })));
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })?;
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
