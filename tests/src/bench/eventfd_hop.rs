//! The one hop a vhost-user file system adds over a FUSE server inside the VMM: the daemon
//! signals its call eventfd, and husk-vmm's event loop (blocked in epoll) wakes up to raise the
//! guest interrupt. Everything else (the guest kick through KVM's ioeventfd, the FUSE work, the
//! interrupt itself) is the same in both designs, so this hop bounds what an in-VMM server saves.
//!
//! Measured as a ping-pong between two threads, each blocked in epoll on an eventfd the other
//! writes, which is exactly the daemon → event-loop wake-up; one hop is half a round trip.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Median one-way wake-up latency over `trips` round trips, in microseconds.
pub fn median_hop_us(trips: usize) -> anyhow::Result<f64> {
    let ping = Arc::new(EventFd::new(0).context("eventfd")?);
    let pong = EventFd::new(0).context("eventfd")?;
    let pong_tx = pong.try_clone().context("eventfd clone")?;
    let ping_rx = ping.clone();
    let echo = std::thread::Builder::new()
        .name("hop-echo".into())
        .spawn(move || -> anyhow::Result<()> {
            let ep = watch(&ping_rx)?;
            for _ in 0..trips {
                wait(&ep, &ping_rx)?;
                pong_tx.write(1).context("write pong")?;
            }
            Ok(())
        })
        .context("spawn the echo thread")?;
    let ep = watch(&pong)?;
    let mut rtt_us = Vec::with_capacity(trips);
    for _ in 0..trips {
        let t = Instant::now();
        ping.write(1).context("write ping")?;
        wait(&ep, &pong)?;
        rtt_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(husk_tests::median(&rtt_us) / 2.0)
}

fn watch(evt: &EventFd) -> anyhow::Result<Epoll> {
    let ep = Epoll::new().context("epoll_create")?;
    ep.ctl(
        ControlOperation::Add,
        std::os::fd::AsRawFd::as_raw_fd(evt),
        EpollEvent::new(EventSet::IN, 0),
    )
    .context("epoll_ctl")?;
    Ok(ep)
}

/// Blocks in epoll until `evt` is readable, then consumes it (as the event loop does).
fn wait(ep: &Epoll, evt: &EventFd) -> anyhow::Result<()> {
    let mut events = [EpollEvent::default(); 1];
    loop {
        match ep.wait(-1, &mut events) {
            Ok(n) if n > 0 => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        }
    }
    evt.read().context("read eventfd")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_a_positive_finite_hop() {
        let us = super::median_hop_us(200).unwrap();
        assert!(us.is_finite() && us > 0.0, "{us}");
    }
}
