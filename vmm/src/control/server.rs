//! The control socket's listener thread. It accepts one client at a time, reads bounded request lines
//! with a timeout, hands each request to the VM's main thread (which owns the vCPUs) and writes back the
//! answer. A slow or malicious client can only hold up other control clients, never the VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{error_reply, parse_request, Request, MAX_REQUEST_LINE};
use super::ControlError;

const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the main thread may take to answer (a pause waits for every vCPU to park).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A request for the main thread, with where to send the answer.
pub struct ControlCommand {
    pub request: Request,
    pub reply: mpsc::Sender<serde_json::Value>,
}

/// Binds `path` (replacing a stale socket, never another kind of file) and serves it on a thread until
/// `stop` is set. Each request is sent on `commands` and announced on `notify`.
pub fn spawn_control_server(
    path: &Path,
    commands: mpsc::Sender<ControlCommand>,
    notify: EventFd,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, ControlError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
                    continue;
                }
                match listener.accept() {
                    Ok((client, _)) => serve_client(client, &commands, &notify, &stop),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::warn!("control socket accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(ControlError::Thread)
}

fn serve_client(
    client: UnixStream,
    commands: &mpsc::Sender<ControlCommand>,
    notify: &EventFd,
    stop: &AtomicBool,
) {
    if client.set_nonblocking(false).is_err()
        || client.set_read_timeout(Some(CLIENT_IO_TIMEOUT)).is_err()
        || client.set_write_timeout(Some(CLIENT_IO_TIMEOUT)).is_err()
    {
        return;
    }
    let Ok(writer) = client.try_clone() else {
        return;
    };
    let mut writer = writer;
    let mut reader = BufReader::new(client);
    let mut line = Vec::new();
    while !stop.load(Ordering::Acquire) {
        line.clear();
        // One byte more than allowed, to tell "too long" from "exactly the limit".
        let limit = (MAX_REQUEST_LINE + 2) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let answer = match parse_request(body) {
            Ok(request) => ask_main_thread(request, commands, notify),
            Err(e) => error_reply(e),
        };
        let mut out = answer.to_string().into_bytes();
        out.push(b'\n');
        if writer.write_all(&out).is_err() || !complete {
            // An overlong line leaves the stream out of sync: answer once, then hang up.
            return;
        }
    }
}

fn ask_main_thread(
    request: Request,
    commands: &mpsc::Sender<ControlCommand>,
    notify: &EventFd,
) -> serde_json::Value {
    let (reply, answer) = mpsc::channel();
    if commands.send(ControlCommand { request, reply }).is_err() || notify.write(1).is_err() {
        return error_reply("the VM is shutting down");
    }
    answer
        .recv_timeout(ANSWER_TIMEOUT)
        .unwrap_or_else(|_| error_reply("the VM did not answer in time"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_requests_and_rejects_garbage_and_overlong_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (tx, rx) = mpsc::channel::<ControlCommand>();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server =
            spawn_control_server(&path, tx, notify.try_clone().unwrap(), stop.clone()).unwrap();
        // A stand-in for the VM's main thread.
        let main = std::thread::spawn(move || {
            while let Ok(cmd) = rx.recv() {
                let _ = cmd
                    .reply
                    .send(serde_json::json!({"ok": true, "echo": format!("{:?}", cmd.request)}));
            }
        });

        let mut c = UnixStream::connect(&path).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut ask = |req: &[u8]| {
            c.write_all(req).unwrap();
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            serde_json::from_str::<serde_json::Value>(&l).unwrap()
        };
        assert_eq!(ask(b"{\"op\":\"state\"}\n")["echo"], "State");
        assert_eq!(ask(b"{\"op\":\"nope\"}\n")["ok"], false);
        assert_eq!(ask(b"{\"op\":\"pause\"}\n")["echo"], "Pause");
        let mut long = vec![b'x'; MAX_REQUEST_LINE * 2];
        long.push(b'\n');
        let answer = ask(&long);
        assert_eq!(answer["ok"], false);
        assert!(answer["error"].as_str().unwrap().contains("longer"));
        // The server hung up after the overlong line.
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0);

        stop.store(true, Ordering::Release);
        server.join().unwrap();
        drop(main);
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        let (tx, _rx) = mpsc::channel();
        let r = spawn_control_server(
            &path,
            tx,
            EventFd::new(0).unwrap(),
            Arc::new(AtomicBool::new(false)),
        );
        assert!(matches!(r, Err(ControlError::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }
}
