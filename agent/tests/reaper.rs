//! The reaper against real children. A test binary of its own: `reap_all`
//! reaps *any* child of the process, so it must not share a process with
//! tests that spawn and wait for children themselves (the network tests run
//! `ip`).

use std::process::Command;
use std::time::Duration;

use husk_agent::reaper::{ExitStatus, Reaper};
use nix::unistd::Pid;

#[test]
// The children are reaped by the Reaper under test, not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn reaps_and_delivers_registered_statuses() {
    let reaper = Reaper::new();

    let mut guard = reaper.lock();
    let ok = Command::new("true").spawn().unwrap();
    let ok_rx = guard.register(ok.id() as i32);
    let three = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
    let three_rx = guard.register(three.id() as i32);
    let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let sleeper_rx = guard.register(sleeper.id() as i32);
    let _unregistered = Command::new("true").spawn().unwrap();
    drop(guard);

    nix::sys::signal::kill(
        Pid::from_raw(sleeper.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let mut rxs = [ok_rx, three_rx, sleeper_rx];
    let mut got: [Option<ExitStatus>; 3] = [None; 3];
    let mut total = 0;
    for _ in 0..500 {
        total += reaper.reap_all();
        for (rx, slot) in rxs.iter_mut().zip(got.iter_mut()) {
            if slot.is_none() {
                *slot = rx.try_recv().ok();
            }
        }
        if got.iter().all(Option::is_some) && total == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(got[0], Some(ExitStatus::Exited(0)));
    assert_eq!(got[1], Some(ExitStatus::Exited(3)));
    assert_eq!(
        got[2],
        Some(ExitStatus::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false
        })
    );
    assert_eq!(total, 4, "the unregistered child is reaped too");
    assert_eq!(reaper.reap_all(), 0);
}
