//! The containerd harness (husk_tests::containerd) and the offline busybox image (`make images`)
//! against runc, without Husk: a private containerd starts, imports the image, runs containers with
//! exit codes, stdin and users as the shim tests will, and leaves nothing behind. Runs in the test host
//! (make e2e), where Debian's containerd 1.6 and runc are installed.

use std::time::{Duration, Instant};

use husk_tests::containerd::{
    busybox_image_tar, Containerd, ContainerdOptions, LeakSnapshot, Stdin, BUSYBOX_IMAGE,
};

const NS: &str = "husk-test";
const RUNC: &str = "io.containerd.runc.v2";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn runc_containers_through_a_private_containerd() {
    let tar = busybox_image_tar().unwrap_or_else(|e| panic!("{e}"));
    let initial = LeakSnapshot::take();

    let t = Instant::now();
    let c = Containerd::start(&ContainerdOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let dir = c.dir().to_path_buf();
    eprintln!("containerd ready in {:?} ({})", t.elapsed(), dir.display());
    let ok = |args: &[&str]| c.ctr_ok(NS, args).unwrap_or_else(|e| panic!("{e}"));

    let t = Instant::now();
    c.import_image(NS, &tar).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("image imported in {:?}", t.elapsed());
    let images = text(&ok(&["images", "ls", "-q"]).stdout);
    assert!(
        images.lines().any(|l| l.trim() == BUSYBOX_IMAGE),
        "image list: {images}"
    );
    let before = LeakSnapshot::take();

    // The exit code of the container is ctr's. On the way, the image: applets are hard links to
    // busybox (not symlinks), /tmp is sticky, the users and groups exist. (One container for both:
    // each `ctr run` takes seconds under emulation.)
    let t = Instant::now();
    let out = c
        .ctr(
            NS,
            [
                "run",
                "--rm",
                "--runtime",
                RUNC,
                BUSYBOX_IMAGE,
                "t1",
                "sh",
                "-c",
                "[ ! -L /bin/ls ] && [ $(stat -c %i /bin/ls) = $(stat -c %i /bin/busybox) ] && \
                 stat -c %a /tmp && id user && exit 3",
            ],
        )
        .unwrap();
    eprintln!("ctr run (exit 3) took {:?}", t.elapsed());
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "1777\nuid=1000(user) gid=1000(user) groups=1000(user),2000(extra)\n"
    );

    // stdin goes through (ctr run always attaches its stdin), and so does its end.
    let out = c
        .ctr_with(
            NS,
            ["run", "--rm", "--runtime", RUNC, BUSYBOX_IMAGE, "t2", "cat"],
            Some(Stdin::for_run(b"hi\n", "t2")),
            Duration::from_secs(120),
        )
        .unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");

    // A process as another user: ctr 1.6's `run` has no --user, its `tasks exec` has.
    ok(&[
        "run",
        "-d",
        "--runtime",
        RUNC,
        BUSYBOX_IMAGE,
        "t4",
        "sleep",
        "600",
    ]);
    let out = ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "--user",
        "1000",
        "--cwd",
        "/home/user",
        "t4",
        "sh",
        "-c",
        "id; pwd",
    ]);
    let out = text(&out.stdout);
    assert!(out.starts_with("uid=1000(user) gid=1000(user)"), "{out}");
    assert!(out.ends_with("\n/home/user\n"), "{out}");
    // stdin into an exec process.
    let out = c
        .ctr_with(
            NS,
            ["tasks", "exec", "--exec-id", "e3", "t4", "wc", "-c"],
            Some(Stdin::for_exec(b"12345", "t4", "e3")),
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!(
        text(&out.stdout).trim(),
        "5",
        "stderr: {}",
        text(&out.stderr)
    );
    ok(&["tasks", "delete", "--force", "t4"]);
    ok(&["containers", "delete", "t4"]);

    let leaks = LeakSnapshot::wait_for_no_leaks(&before, Duration::from_secs(30));
    assert!(
        leaks.is_empty(),
        "left behind by runc containers: {leaks:#?}"
    );

    // Dropping the harness stops containerd and removes its directory.
    drop(c);
    assert!(!dir.exists(), "{} was not removed", dir.display());
    let leaks = LeakSnapshot::wait_for_no_leaks(&initial, Duration::from_secs(10));
    assert!(leaks.is_empty(), "left behind by the harness: {leaks:#?}");
}
