//! cgroup v2 device control: `linux.resources.devices` compiled to an eBPF
//! program of type `BPF_PROG_TYPE_CGROUP_DEVICE`, attached to the
//! container's cgroup (v2 has no devices.allow file). Written by hand: the
//! program is a straight list of rule checks, a few dozen instructions.
//!
//! Semantics (runc's): rules apply in order and the last matching rule
//! wins; nothing matching is denied. The engine appends allow rules for the
//! device nodes every container gets (/dev/null, zero, full, random,
//! urandom, tty, console, ptmx, pts/*) and for those in `linux.devices`,
//! after the spec's rules, as runc does, so a leading "deny all" (what
//! containerd sends) still leaves a usable /dev. A spec without device
//! rules gets no program (everything allowed).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::EngineError;

/// One rule, resolved: `None` is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Allow (true) or deny.
    pub allow: bool,
    /// `BPF_DEVCG_DEV_CHAR` (2) / `BPF_DEVCG_DEV_BLOCK` (1), or any.
    pub dev_type: Option<u32>,
    /// Major number.
    pub major: Option<u32>,
    /// Minor number.
    pub minor: Option<u32>,
    /// `BPF_DEVCG_ACC_*` bits: mknod 1, read 2, write 4.
    pub access: u32,
}

const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_ALL: u32 = 7;

/// Char devices every container may use (with the nodes the engine creates).
const DEFAULT_ALLOWED: &[(u32, Option<u32>)] = &[
    (1, Some(3)), // null
    (1, Some(5)), // zero
    (1, Some(7)), // full
    (1, Some(8)), // random
    (1, Some(9)), // urandom
    (5, Some(0)), // tty
    (5, Some(1)), // console
    (5, Some(2)), // ptmx
    (136, None),  // pts/*
];

fn access_bits(s: &str, field: &str) -> Result<u32, EngineError> {
    if s.is_empty() {
        return Ok(ACC_ALL);
    }
    let mut bits = 0;
    for c in s.chars() {
        bits |= match c {
            'm' => 1,
            'r' => 2,
            'w' => 4,
            _ => {
                return Err(EngineError::invalid(
                    field,
                    format!("{s:?}: access is made of r, w and m"),
                ))
            }
        };
    }
    Ok(bits)
}

fn number(n: Option<i64>, field: &str) -> Result<Option<u32>, EngineError> {
    match n {
        None | Some(-1) => Ok(None),
        // Compared as a 32-bit immediate in the program.
        Some(n) if (0..=i64::from(i32::MAX)).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(EngineError::invalid(
            field,
            format!("{n} is not a device number"),
        )),
    }
}

/// The rules for a spec: its own (`linux.resources.devices`, field names
/// for errors under `field`), then the defaults and `extra` (the char/block
/// devices of `linux.devices`: (block, major, minor)) allowed. `None` if the
/// spec has no rules.
pub fn rules(
    spec_rules: &[LinuxDeviceCgroup],
    field: &str,
    extra: &[(bool, u32, u32)],
) -> Result<Option<Vec<Rule>>, EngineError> {
    if spec_rules.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(spec_rules.len() + DEFAULT_ALLOWED.len() + extra.len());
    for (i, r) in spec_rules.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let dev_type = match r.typ() {
            None | Some(LinuxDeviceType::A) => None,
            Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => Some(DEV_CHAR),
            Some(LinuxDeviceType::B) => Some(DEV_BLOCK),
            Some(t) => {
                return Err(EngineError::invalid(
                    format!("{f}.type"),
                    format!("{t:?} is not a, c or b"),
                ))
            }
        };
        out.push(Rule {
            allow: r.allow(),
            dev_type,
            major: number(r.major(), &format!("{f}.major"))?,
            minor: number(r.minor(), &format!("{f}.minor"))?,
            access: access_bits(r.access().as_deref().unwrap_or(""), &format!("{f}.access"))?,
        });
    }
    for (major, minor) in DEFAULT_ALLOWED {
        out.push(Rule {
            allow: true,
            dev_type: Some(DEV_CHAR),
            major: Some(*major),
            minor: *minor,
            access: ACC_ALL,
        });
    }
    for (block, major, minor) in extra {
        out.push(Rule {
            allow: true,
            dev_type: Some(if *block { DEV_BLOCK } else { DEV_CHAR }),
            major: Some(*major),
            minor: Some(*minor),
            access: ACC_ALL,
        });
    }
    Ok(Some(out))
}

// ---- eBPF encoding ----

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// `dst = *(u32 *)(src + off)`.
fn ldx_w(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x61, dst, src, off, 0)
}
fn mov64_reg(dst: u8, src: u8) -> u64 {
    insn(0xbf, dst, src, 0, 0)
}
fn mov64_imm(dst: u8, imm: i32) -> u64 {
    insn(0xb7, dst, 0, 0, imm)
}
fn and64_imm(dst: u8, imm: i32) -> u64 {
    insn(0x57, dst, 0, 0, imm)
}
fn rsh64_imm(dst: u8, imm: i32) -> u64 {
    insn(0x77, dst, 0, 0, imm)
}
/// `if dst != imm goto pc + 1 + off`.
fn jne_imm(dst: u8, imm: i32, off: i16) -> u64 {
    insn(0x55, dst, 0, off, imm)
}
fn exit() -> u64 {
    insn(0x95, 0, 0, 0, 0)
}

/// The program for `rules`: the last matching rule decides, no match
/// denies. Context (`struct bpf_cgroup_dev_ctx`): `access_type` (type in
/// the low 16 bits, access above), `major`, `minor`, each a u32.
pub fn program(rules: &[Rule]) -> Vec<u64> {
    let mut p = vec![
        ldx_w(R2, R1, 0),
        mov64_reg(R3, R2),
        and64_imm(R3, 0xffff), // r3 = type
        rsh64_imm(R2, 16),     // r2 = access
        ldx_w(R4, R1, 4),      // r4 = major
        ldx_w(R5, R1, 8),      // r5 = minor
    ];
    for r in rules.iter().rev() {
        // Each check jumps past the end of this rule's block on mismatch;
        // offsets are patched once the block's length is known.
        let mut block: Vec<u64> = Vec::new();
        let mut jumps = Vec::new();
        if let Some(t) = r.dev_type {
            jumps.push(block.len());
            block.push(jne_imm(R3, t as i32, 0));
        }
        if r.access != ACC_ALL {
            // Every requested access bit must be in the rule's.
            block.push(mov64_reg(R0, R2));
            block.push(and64_imm(R0, (!r.access & ACC_ALL) as i32));
            jumps.push(block.len());
            block.push(jne_imm(R0, 0, 0));
        }
        if let Some(m) = r.major {
            jumps.push(block.len());
            block.push(jne_imm(R4, m as i32, 0));
        }
        if let Some(m) = r.minor {
            jumps.push(block.len());
            block.push(jne_imm(R5, m as i32, 0));
        }
        block.push(mov64_imm(R0, i32::from(r.allow)));
        block.push(exit());
        let len = block.len();
        let unconditional = jumps.is_empty();
        for j in jumps {
            let off = (len - j - 1) as i16;
            block[j] = (block[j] & !(0xffff << 16)) | (u64::from(off as u16) << 16);
        }
        p.extend(block);
        if unconditional {
            // Matches everything: the rules before it (in spec order) can
            // never decide, and the verifier refuses unreachable code.
            return p;
        }
    }
    p.push(mov64_imm(R0, 0));
    p.push(exit());
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// Most instructions accepted (the kernel allows 4096 for unprivileged and
/// a million for privileged loaders; a spec with this many rules is wrong).
const MAX_INSNS: usize = 4096;

/// The leading part of `union bpf_attr` for BPF_PROG_LOAD.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading part of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn load(insns: &[u64]) -> Result<OwnedFd, EngineError> {
    if insns.len() > MAX_INSNS {
        return Err(EngineError::invalid(
            "linux.resources.devices",
            format!("too many rules ({} instructions)", insns.len()),
        ));
    }
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"husk_devcg");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..ProgLoadAttr::default()
    };
    // SAFETY: bpf(2) with a properly sized attr whose pointers (insns,
    // license) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a new descriptor owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let first = std::io::Error::last_os_error();
    // Again with the verifier log, to say why.
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: as above; the log buffer outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a new descriptor owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end.min(2000)]).into_owned();
    Err(EngineError::Internal(format!(
        "loading the device cgroup program: {first}; verifier: {text}"
    )))
}

/// Compiles `rules`, loads the program and attaches it to the cgroup
/// directory `cgroup`. The attachment keeps the program alive; it goes with
/// the cgroup.
pub fn attach(cgroup: &Path, rules: &[Rule]) -> Result<(), EngineError> {
    let prog = load(&program(rules))?;
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| EngineError::Internal(format!("opening cgroup {}: {e}", cgroup.display())))?;
    let attr = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: bpf(2) with a properly sized attr holding two open fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if r != 0 {
        return Err(EngineError::Internal(format!(
            "attaching the device program to {}: {}",
            cgroup.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one access, in a tiny interpreter of the
    /// instructions `program` emits.
    fn eval(p: &[u64], dev_type: u32, access: u32, major: u32, minor: u32) -> u64 {
        let mut r = [0u64; 11];
        let ctx = [(access << 16) | dev_type, major, minor];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let code = (i & 0xff) as u8;
            let dst = ((i >> 8) & 0xf) as usize;
            let src = ((i >> 12) & 0xf) as usize;
            let off = ((i >> 16) & 0xffff) as u16 as i16;
            let imm = (i >> 32) as u32 as i32 as i64 as u64;
            pc += 1;
            match code {
                0x61 => {
                    assert_eq!(src, 1);
                    r[dst] = u64::from(ctx[off as usize / 4]);
                }
                0xbf => r[dst] = r[src],
                0xb7 => r[dst] = imm,
                0x57 => r[dst] &= imm,
                0x77 => r[dst] >>= imm,
                0x55 => {
                    if r[dst] != imm {
                        pc = (pc as i64 + i64::from(off)) as usize;
                    }
                }
                0x95 => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn spec_rules(j: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn last_match_wins_and_defaults_are_allowed() {
        let r = rules(
            &spec_rules(
                r#"[{"allow":false,"access":"rwm"},
                    {"allow":true,"type":"c","major":10,"minor":200,"access":"rw"},
                    {"allow":true,"type":"b","major":8,"access":"r"},
                    {"allow":false,"type":"b","major":8,"minor":1}]"#,
            ),
            "linux.resources.devices",
            &[(false, 10, 229)],
        )
        .unwrap()
        .unwrap();
        let p = program(&r);
        let (c, b) = (DEV_CHAR, DEV_BLOCK);
        let (m, rd, wr) = (1, 2, 4);
        assert_eq!(eval(&p, c, rd | wr, 1, 3), 1, "/dev/null by default");
        assert_eq!(eval(&p, c, rd, 136, 7), 1, "pts/* by default");
        assert_eq!(eval(&p, c, rd, 1, 11), 0, "kmsg: deny all");
        assert_eq!(eval(&p, c, rd | wr, 10, 200), 1, "tun rw");
        assert_eq!(eval(&p, c, m, 10, 200), 0, "tun: no mknod");
        assert_eq!(eval(&p, b, rd, 8, 0), 1, "sda read");
        assert_eq!(eval(&p, b, wr, 8, 0), 0, "sda write");
        assert_eq!(eval(&p, b, rd, 8, 1), 0, "sda1: later deny wins");
        assert_eq!(eval(&p, c, rd, 8, 0), 0, "type matters");
        assert_eq!(
            eval(&p, c, m | rd | wr, 10, 229),
            1,
            "linux.devices allowed"
        );
        // No rules: no program.
        assert!(rules(&[], "x", &[]).unwrap().is_none());
        // Allow all first: everything allowed.
        let r = rules(&spec_rules(r#"[{"allow":true}]"#), "x", &[])
            .unwrap()
            .unwrap();
        assert_eq!(eval(&program(&r), b, wr, 253, 9), 1);
    }

    #[test]
    fn bad_rules_name_the_field() {
        let e = rules(
            &spec_rules(r#"[{"allow":true,"access":"rwx"}]"#),
            "linux.resources.devices",
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("linux.resources.devices[0].access:"),
            "{e}"
        );
        let e = rules(
            &spec_rules(r#"[{"allow":true,"major":-5}]"#),
            "linux.resources.devices",
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("linux.resources.devices[0].major:"),
            "{e}"
        );
    }
}
