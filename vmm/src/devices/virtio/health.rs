//! What a device does when its guest misbehaves, shared by block, net and vsock.
//!
//! * [`DeviceState`]: a device is inactive, active, or waiting for a reset. A ring that breaks at
//!   run time (an available index more than a queue's size ahead, a head index beyond the queue,
//!   ring memory that cannot be accessed) is a driver bug the device cannot repair, so it drops
//!   its queues, raises a configuration-change interrupt and reports `DEVICE_NEEDS_RESET`
//!   (through [`super::VirtioDevice::needs_reset`], which the transport reads) until the driver
//!   resets it (virtio 1.2, 2.1.2). No queue is touched in between.
//! * The ring operations ([`pop`], [`add_used`], [`enable_notification`],
//!   [`disable_notification`]) turn every failure of `virtio-queue` into a [`RingError`], so that
//!   "the ring is empty" and "the ring is broken" are told apart (`pop_descriptor_chain` returns
//!   `None` for both, and logs an error each time).
//! * [`LogLimit`] and [`warn_limited!`]: problems a guest can trigger at will are logged loudly
//!   the first few times and then only at powers of two, so a guest cannot flood the host log.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events};
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemory, IrqTrigger, VIRTIO_MMIO_INT_CONFIG};

/// Counts occurrences of one guest-triggerable problem and decides which are worth a warning:
/// the first [`LogLimit::LOUD`], then the powers of two (so 1 GiB of bad chains costs 46 lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimit {
    count: u64,
}

impl LogLimit {
    /// Occurrences that are always logged.
    pub const LOUD: u64 = 16;

    /// Records one occurrence; `Some(total so far)` if it should be logged loudly.
    pub fn hit(&mut self) -> Option<u64> {
        self.count = self.count.saturating_add(1);
        (self.count <= Self::LOUD || self.count.is_power_of_two()).then_some(self.count)
    }

    /// Occurrences recorded so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// `warn!` through a [`LogLimit`]: loud occurrences are warnings carrying the running count as
/// `occurrences`, the rest go to `debug!`. Takes the limiter (a place expression) and then the
/// usual `tracing` fields and message.
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        match $limit.hit() {
            Some(n) => ::tracing::warn!(occurrences = n, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    };
}
pub(crate) use warn_limited;

/// A queue can no longer be trusted; the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("queue {queue}: cannot read the available ring: {source}")]
    Avail {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: the available index says more is there, but the entry cannot be read")]
    AvailEntry { queue: usize },
    #[error(
        "queue {queue}: available entry names descriptor {head}, beyond the queue size {size}"
    )]
    HeadIndex { queue: usize, head: u16, size: u16 },
    #[error("queue {queue}: cannot return descriptor {head} through the used ring: {source}")]
    Used {
        queue: usize,
        head: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: cannot update notification suppression: {source}")]
    Notification {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: the ring claims more available entries, but none can be taken")]
    Stuck { queue: usize },
    /// Host side, at activation: the event loop could not watch a queue's notification eventfd
    /// or the device's backend (no fds or memory left). The device would sit deaf; failing it
    /// makes that visible in its status, and a reset by the driver tries again.
    #[error("the event loop cannot watch {what}: {reason}")]
    Unwatched { what: String, reason: String },
}

/// Takes the next available chain of queue `index`: `Ok(None)` if there is none, an error if the
/// ring is broken. Unlike `pop_descriptor_chain` it checks the head index, so a bad head is a
/// broken ring here rather than a chain whose `add_used` fails later.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    index: usize,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, RingError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|source| RingError::Avail {
            queue: index,
            source,
        })?;
    if avail == Wrapping(queue.next_avail()) {
        return Ok(None);
    }
    let size = queue.size();
    // `iter` re-reads the index and rejects one more than a queue size ahead.
    let chain = queue
        .iter(mem)
        .map_err(|source| RingError::Avail {
            queue: index,
            source,
        })?
        .next()
        .ok_or(RingError::AvailEntry { queue: index })?;
    if chain.head_index() >= size {
        return Err(RingError::HeadIndex {
            queue: index,
            head: chain.head_index(),
            size,
        });
    }
    Ok(Some(chain))
}

/// Returns chain `head` of queue `index` to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: usize,
    head: u16,
    len: u32,
) -> Result<(), RingError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| RingError::Used {
            queue: index,
            head,
            source,
        })
}

/// Asks the driver for notifications again; `true` if chains arrived meanwhile.
pub fn enable_notification(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: usize,
) -> Result<bool, RingError> {
    queue
        .enable_notification(mem)
        .map_err(|source| RingError::Notification {
            queue: index,
            source,
        })
}

/// Passes in a row that may pop nothing while the ring claims more, before it counts as broken.
pub const MAX_EMPTY_PASSES: u32 = 16;

/// Ends a drain pass of queue `index`: re-enables notifications and tells whether to drain again.
/// A chain the driver queued between the pass's last pop and the re-enable would otherwise wait
/// for a notification that never comes, so "more" means another pass, also after a pass that
/// popped nothing: the driver may have queued it just after our last (empty) pop. A driver whose
/// ring keeps claiming more while nothing can be popped (an index flipping back and forth) gets
/// [`MAX_EMPTY_PASSES`] passes, then its ring counts as broken, so it cannot spin the event loop.
pub fn rearm(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: usize,
    popped: bool,
    empty_passes: &mut u32,
) -> Result<bool, RingError> {
    if popped {
        *empty_passes = 0;
    }
    if !enable_notification(queue, mem, index)? {
        return Ok(false);
    }
    if !popped {
        *empty_passes += 1;
        if *empty_passes > MAX_EMPTY_PASSES {
            return Err(RingError::Stuck { queue: index });
        }
    }
    Ok(true)
}

/// Watches queue `queue`'s notification eventfd on the event loop, delivered as `data`; returns the
/// clone that is registered, which the device keeps to unregister later.
pub fn watch_queue(
    ops: &mut EventOps,
    evt: &EventFd,
    queue: usize,
    data: u32,
) -> Result<EventFd, RingError> {
    let unwatched = |reason| RingError::Unwatched {
        what: format!("queue {queue}'s notifications"),
        reason,
    };
    let clone = evt.try_clone().map_err(|e| unwatched(e.to_string()))?;
    ops.add(Events::with_data(&clone, data, EventSet::IN))
        .map_err(|e| unwatched(format!("{e:?}")))?;
    Ok(clone)
}

/// [`watch_queue`] for every queue of a device, queue `i` delivered as `first_data + i`, in
/// order; the registered clones are appended to `registered` (also those before a failure, so
/// the device can unregister them).
pub fn watch_queues(
    ops: &mut EventOps,
    evts: &[EventFd],
    first_data: u32,
    registered: &mut Vec<EventFd>,
) -> Result<(), RingError> {
    for (i, evt) in evts.iter().enumerate() {
        registered.push(watch_queue(ops, evt, i, first_data + i as u32)?);
    }
    Ok(())
}

/// Tells the driver it need not notify us (we are draining the ring anyway).
pub fn disable_notification(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: usize,
) -> Result<(), RingError> {
    queue
        .disable_notification(mem)
        .map_err(|source| RingError::Notification {
            queue: index,
            source,
        })
}

/// Where a device stands in the life of one driver instance.
#[derive(Debug)]
pub enum Phase<A> {
    /// Before `DRIVER_OK`, or after a reset.
    Inactive,
    /// Processing its queues; `A` is everything that lives from activation to reset.
    Active(A),
    /// A ring broke: the queues are dropped and nothing is processed until the driver resets
    /// the device.
    NeedsReset,
}

/// A device's [`Phase`] plus the log limiter for its ring failures, which survives resets (a
/// guest could otherwise break and reset a ring in a loop, one error line each time).
#[derive(Debug)]
pub struct DeviceState<A> {
    phase: Phase<A>,
    faults: LogLimit,
}

impl<A> Default for DeviceState<A> {
    fn default() -> Self {
        Self {
            phase: Phase::Inactive,
            faults: LogLimit::default(),
        }
    }
}

impl<A: AsRef<IrqTrigger>> DeviceState<A> {
    pub fn phase(&self) -> &Phase<A> {
        &self.phase
    }

    pub fn active(&self) -> Option<&A> {
        match &self.phase {
            Phase::Active(a) => Some(a),
            _ => None,
        }
    }

    pub fn active_mut(&mut self) -> Option<&mut A> {
        match &mut self.phase {
            Phase::Active(a) => Some(a),
            _ => None,
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Active(_))
    }

    pub fn is_inactive(&self) -> bool {
        matches!(self.phase, Phase::Inactive)
    }

    pub fn needs_reset(&self) -> bool {
        matches!(self.phase, Phase::NeedsReset)
    }

    /// Ring failures so far, over all driver instances.
    pub fn faults(&self) -> u64 {
        self.faults.count()
    }

    /// `DRIVER_OK`: starts processing. The caller has checked that the device was inactive.
    pub fn activate(&mut self, active: A) {
        self.phase = Phase::Active(active);
    }

    /// The driver reset the device: whatever phase it was in, it starts over.
    pub fn reset(&mut self) {
        self.phase = Phase::Inactive;
    }

    /// Runs `f` on the active state, if the device is active. A [`RingError`] moves the device
    /// to [`Phase::NeedsReset`] (see [`Self::fail`]) and yields `None`.
    pub fn run<R>(
        &mut self,
        device: &'static str,
        f: impl FnOnce(&mut A) -> Result<R, RingError>,
    ) -> Option<R> {
        let a = self.active_mut()?;
        match f(a) {
            Ok(r) => Some(r),
            Err(e) => {
                self.fail(device, &e);
                None
            }
        }
    }

    /// A ring broke: drop the queues, raise the configuration-change interrupt so the driver
    /// reads the status and finds `DEVICE_NEEDS_RESET`, and stop. Only an active device can
    /// break; in any other phase this does nothing.
    pub fn fail(&mut self, device: &'static str, err: &RingError) {
        if !self.is_active() {
            debug!(device, "{device}: ring error while not active: {err}");
            return;
        }
        let Phase::Active(a) = std::mem::replace(&mut self.phase, Phase::NeedsReset) else {
            return;
        };
        warn_limited!(
            self.faults,
            device,
            "{device}: {err}; the device needs a reset"
        );
        if let Err(e) = a.as_ref().trigger(VIRTIO_MMIO_INT_CONFIG) {
            warn!(device, "{device}: cannot raise the config interrupt: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
    use vm_memory::{Bytes, GuestAddress};

    struct Irq(IrqTrigger);

    impl AsRef<IrqTrigger> for Irq {
        fn as_ref(&self) -> &IrqTrigger {
            &self.0
        }
    }

    #[test]
    fn log_limit_is_loud_first_then_at_powers_of_two() {
        let mut l = LogLimit::default();
        let loud: Vec<u64> = (0..5000).filter_map(|_| l.hit()).collect();
        let mut expected: Vec<u64> = (1..=16).collect();
        expected.extend([32, 64, 128, 256, 512, 1024, 2048, 4096]);
        assert_eq!(loud, expected);
        assert_eq!(l.count(), 5000);
        // Never wraps back to "loud" territory.
        let mut l = LogLimit {
            count: u64::MAX - 1,
        };
        assert_eq!(l.hit(), None);
        assert_eq!(l.hit(), None);
        assert_eq!(l.count(), u64::MAX);
    }

    #[test]
    fn warn_limited_counts_every_occurrence() {
        let mut l = LogLimit::default();
        for i in 0..100 {
            warn_limited!(l, i, "test problem");
        }
        assert_eq!(l.count(), 100);
    }

    #[test]
    fn rearm_drains_again_after_a_race_and_gives_up_on_a_flipping_index() {
        let mem = test_memory();
        let mut g = GuestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = g.device_queue();
        let mut empty = 0;
        // Empty ring: done.
        assert!(pop(&mut q, &mem, 0).unwrap().is_none());
        assert!(!rearm(&mut q, &mem, 0, false, &mut empty).unwrap());
        // The driver queues a chain right after our last (empty) pop: drain again, and the
        // next pop finds it. Not a broken ring.
        assert!(pop(&mut q, &mem, 0).unwrap().is_none());
        let head = g.add_chain(&[(0x8000, 16, false)]);
        assert!(rearm(&mut q, &mem, 0, false, &mut empty).unwrap());
        assert_eq!(pop(&mut q, &mem, 0).unwrap().unwrap().head_index(), head);
        assert!(!rearm(&mut q, &mem, 0, true, &mut empty).unwrap());
        assert_eq!(empty, 0, "a pass that popped resets the count");
        // A ring that keeps claiming more while nothing is popped: bounded, then broken.
        g.add_chain(&[(0x8000, 16, false)]);
        for _ in 0..MAX_EMPTY_PASSES {
            assert!(rearm(&mut q, &mem, 0, false, &mut empty).unwrap());
        }
        assert!(matches!(
            rearm(&mut q, &mem, 0, false, &mut empty),
            Err(RingError::Stuck { queue: 0 })
        ));
    }

    #[test]
    fn pop_tells_empty_from_broken() {
        let mem = test_memory();
        let mut g = GuestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = g.device_queue();
        assert!(pop(&mut q, &mem, 0).unwrap().is_none());
        let head = g.add_chain(&[(0x8000, 16, false)]);
        let chain = pop(&mut q, &mem, 0).unwrap().unwrap();
        assert_eq!(chain.head_index(), head);
        assert!(pop(&mut q, &mem, 0).unwrap().is_none());
        add_used(&mut q, &mem, 0, head, 0).unwrap();
        assert_eq!(g.pop_used(), Some((u32::from(head), 0)));

        // A head beyond the queue.
        g.publish(16);
        assert!(matches!(
            pop(&mut q, &mem, 3),
            Err(RingError::HeadIndex {
                queue: 3,
                head: 16,
                size: 16
            })
        ));
        // An available index more than a queue size ahead.
        let (_, avail, _) = g.addrs();
        let next = q.next_avail();
        mem.write_obj(next.wrapping_add(17), GuestAddress(avail + 2))
            .unwrap();
        assert!(matches!(
            pop(&mut q, &mem, 1),
            Err(RingError::Avail { queue: 1, .. })
        ));
        assert!(matches!(
            add_used(&mut q, &mem, 1, 16, 0),
            Err(RingError::Used { head: 16, .. })
        ));
    }

    #[test]
    fn failure_moves_an_active_device_to_needs_reset_once() {
        let irq = IrqTrigger::new().unwrap();
        let mut s = DeviceState::<Irq>::default();
        assert!(s.is_inactive());
        assert_eq!(
            s.run("test", |_| Ok(1)),
            None,
            "inactive devices do not run"
        );
        s.activate(Irq(irq.clone()));
        assert_eq!(s.run("test", |_| Ok(1)), Some(1));
        assert_eq!(irq.status(), 0);
        let r: Option<()> = s.run("test", |_| Err(RingError::Stuck { queue: 0 }));
        assert_eq!(r, None);
        assert!(s.needs_reset() && s.active().is_none());
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.event().read().unwrap(), 1);
        // Further failures (and runs) do nothing until the reset.
        let mut ran = false;
        s.run("test", |_| {
            ran = true;
            Ok(())
        });
        assert!(!ran);
        s.fail("test", &RingError::Stuck { queue: 0 });
        assert!(irq.event().read().is_err(), "a second config interrupt");
        assert_eq!(s.faults(), 1);
        s.reset();
        assert!(s.is_inactive());
        s.activate(Irq(irq.clone()));
        assert!(s.is_active());
    }
}
