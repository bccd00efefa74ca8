//! The virtio-fs device: vhost-user negotiation when it is created, the memory table and the
//! vrings when the driver starts it, and the event-loop glue that turns the backend's used-ring
//! notifications into the device's interrupt.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::warn;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{config_space, FsConfig, FsError, CONFIG_LEN, NUM_QUEUES, QUEUE_SIZE};
use crate::failure::DeviceFailure;
use crate::snapshot::SnapshotError;
use crate::virtio::common::{read_config_bytes, ready_queues, VirtioCommon};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};

/// The virtio features rvmm passes on from the backend: the split ring's, nothing the transport
/// cannot carry (packed rings, IOMMU).
const RELAYED_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;
/// Protocol features rvmm uses: the backend's queue count.
const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ;

/// A virtio-fs device whose queues an external vhost-user backend serves.
pub struct Fs {
    tag: String,
    config: [u8; CONFIG_LEN],
    frontend: Frontend,
    /// What the backend offers, masked to [`RELAYED_FEATURES`].
    avail_features: u64,
    acked_features: u64,
    /// VHOST_USER_F_PROTOCOL_FEATURES was negotiated: the rings start disabled.
    protocol: bool,
    /// Kick fds are the queue eventfds, which KVM signals; the device never reads them.
    common: VirtioCommon<NUM_QUEUES>,
    /// The backend signals these when it returns buffers.
    call_evts: [EventFd; NUM_QUEUES],
    disconnected: bool,
    /// Where a hang-up of the backend is reported: the VM cannot go on without it.
    failure: Arc<DeviceFailure>,
}

fn protocol(step: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::Protocol { step, source }
}

impl Fs {
    /// Connects to the backend at `cfg.socket` and negotiates what it offers; a later hang-up
    /// of the backend goes to `failure`.
    pub fn new(cfg: FsConfig, failure: Arc<DeviceFailure>) -> Result<Self, FsError> {
        let frontend = Frontend::connect(&cfg.socket, NUM_QUEUES as u64).map_err(|source| {
            FsError::Connect {
                path: cfg.socket.clone(),
                source,
            }
        })?;
        Self::with_frontend(&cfg.tag, frontend, failure)
    }

    /// Takes ownership of the backend behind `frontend` and reads its features.
    pub(super) fn with_frontend(
        tag: &str,
        mut frontend: Frontend,
        failure: Arc<DeviceFailure>,
    ) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let features = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::Unsupported("VIRTIO_F_VERSION_1"));
        }
        let has_protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if has_protocol {
            negotiate_protocol(&mut frontend)?;
        }
        let call_evts = [
            EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
            EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
        ];
        Ok(Self {
            tag: tag.to_string(),
            config,
            frontend,
            avail_features: features & RELAYED_FEATURES,
            acked_features: 0,
            protocol: has_protocol,
            common: VirtioCommon::new("virtio-fs", QUEUE_SIZE).map_err(FsError::EventFd)?,
            call_evts,
            disconnected: false,
            failure,
        })
    }

    /// Gives the backend the memory table and every vring, then enables them.
    fn start_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        interrupt: &VirtioInterrupt,
    ) -> Result<(), FsError> {
        if self.disconnected {
            return Err(FsError::Disconnected);
        }
        let mut features = self.acked_features;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        // virtiofsd raises the guest's interrupt itself where the line is an irqfd; else
        // rvmm relays its call eventfds.
        let irqfd = interrupt.irqfd_for_backend();
        let f = &mut self.frontend;
        f.set_features(features).map_err(protocol("SET_FEATURES"))?;
        f.set_mem_table(&memory_table(mem)?)
            .map_err(protocol("SET_MEM_TABLE"))?;
        for (index, queue) in queues.iter().enumerate() {
            f.set_vring_num(index, queue.size())
                .map_err(protocol("SET_VRING_NUM"))?;
            f.set_vring_addr(index, &vring_addresses(mem, index, queue)?)
                .map_err(protocol("SET_VRING_ADDR"))?;
            f.set_vring_base(index, queue.next_avail())
                .map_err(protocol("SET_VRING_BASE"))?;
            f.set_vring_call(index, irqfd.unwrap_or(&self.call_evts[index]))
                .map_err(protocol("SET_VRING_CALL"))?;
            f.set_vring_kick(index, &self.common.queue_events()[index])
                .map_err(protocol("SET_VRING_KICK"))?;
            if self.protocol {
                f.set_vring_enable(index, true)
                    .map_err(protocol("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops every vring; GET_VRING_BASE is what makes the backend let go of one.
    fn stop_backend(&mut self) -> Result<(), FsError> {
        for index in 0..NUM_QUEUES {
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(protocol("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(protocol("GET_VRING_BASE"))?;
        }
        Ok(())
    }

    /// The backend's socket closed: its queues will never be served again, so the VM stops.
    fn backend_gone(&mut self, ops: &mut EventOps) {
        self.disconnected = true;
        self.failure.report(format!(
            "virtio-fs \"{}\": the vhost-user backend hung up",
            self.tag
        ));
        if let Err(e) = ops.remove(Events::empty(&self.frontend)) {
            warn!(
                "virtio-fs {}: cannot stop watching the backend: {e:?}",
                self.tag
            );
        }
    }
}

/// Reads the backend's protocol features and accepts those rvmm uses; with MQ, checks that it
/// serves both queues.
fn negotiate_protocol(frontend: &mut Frontend) -> Result<(), FsError> {
    let offered = frontend
        .get_protocol_features()
        .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
    let acked = offered & PROTOCOL_FEATURES;
    frontend
        .set_protocol_features(acked)
        .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
    if acked.contains(VhostUserProtocolFeatures::MQ) {
        let queues = frontend
            .get_queue_num()
            .map_err(protocol("GET_QUEUE_NUM"))?;
        if queues < NUM_QUEUES as u64 {
            return Err(FsError::Unsupported("two queues"));
        }
    }
    Ok(())
}

/// Every guest RAM region with the fd and offset the backend maps it from.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| FsError::NotShareable)
        })
        .collect()
}

/// The queue's rings as addresses in rvmm's mapping, which the memory table translates.
fn vring_addresses(
    mem: &GuestMemoryMmap,
    index: usize,
    queue: &Queue,
) -> Result<VringConfigData, FsError> {
    let host = |gpa: u64| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| FsError::QueueAddress(index))
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host(queue.desc_table())?,
        used_ring_addr: host(queue.used_ring())?,
        avail_ring_addr: host(queue.avail_ring())?,
        log_addr: None,
    })
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.common.ignore_config_write(offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        self.common.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.common.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        // The backend sees only queues that passed the same checks as every device's.
        let queues: [Queue; NUM_QUEUES] = ready_queues(queues)?;
        self.start_backend(&mem, &queues, &interrupt)
            .map_err(|e| ActivateError::Backend(Box::new(e)))?;
        self.common.activate(mem, queues.into(), interrupt)
    }

    fn reset(&mut self) -> bool {
        if self.common.reset().is_none() || self.disconnected {
            return true;
        }
        match self.stop_backend() {
            Ok(()) => true,
            Err(e) => {
                warn!(
                    "virtio-fs {}: cannot stop the backend: {}",
                    self.tag,
                    crate::error_chain(&e)
                );
                false
            }
        }
    }

    fn queue_positions(&self) -> Result<Vec<(u16, u16)>, SnapshotError> {
        // The backend serves the queues: where it stands, and what it holds, is its own.
        Err(SnapshotError::Unsupported("virtio-fs"))
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.frontend.as_raw_fd() {
            self.backend_gone(ops);
            return;
        }
        if let Some(evt) = self.call_evts.iter().find(|e| e.as_raw_fd() == fd) {
            // The count does not matter: one interrupt covers every buffer returned so far.
            let _ = evt.read();
            self.common.signal_used_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.call_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("virtio-fs {}: cannot watch a call eventfd: {e:?}", self.tag);
            }
        }
        // Only the hang-up: the replies to the vCPU thread's requests arrive on this socket too.
        if let Err(e) = ops.add(Events::new(&self.frontend, EventSet::READ_HANG_UP)) {
            warn!(
                "virtio-fs {}: cannot watch the backend socket: {e:?}",
                self.tag
            );
        }
    }
}
