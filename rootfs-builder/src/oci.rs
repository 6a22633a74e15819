//! A tiny OCI image (busybox only) as an OCI image layout archive, for tests and the demo: containerd
//! imports it with `ctr images import` without any registry.
//!
//! The archive holds `oci-layout`, `index.json` and `blobs/sha256/...`: one uncompressed layer, the image
//! config and the manifest. The index names the image with `io.containerd.image.name` (what containerd's
//! importer uses) and `org.opencontainers.image.ref.name` (the tag, as containerd's own exporter writes
//! it). Reproducible: fixed times and owners, entries in a fixed order, JSON with sorted keys, so the same
//! busybox gives the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// Every file in both archives gets this mtime (2000-01-01T00:00:00Z): a fixed value keeps the bytes
/// reproducible, and a non-zero one keeps tools that treat 0 as "unset" quiet.
pub const FIXED_MTIME: u64 = 946_684_800;

/// The PATH every container of the image starts with (the usual Linux default).
pub const IMAGE_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The unprivileged test user: `user` uid/gid 1000, also in the supplementary group `extra` (2000).
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
user:x:1000:1000:user:/home/user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
pub const GROUP: &str = "root:x:0:\n\
user:x:1000:\n\
extra:x:2000:user\n\
nogroup:x:65534:\n";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF executable for a known architecture ({why})")]
    NotExecutable { path: PathBuf, why: &'static str },
    #[error("cannot list the applets of {path}: {why}")]
    Applets { path: PathBuf, why: String },
    #[error("invalid image name {name:?}: {why}")]
    Name { name: String, why: &'static str },
    #[error("building the OCI JSON: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing the archive: {0}")]
    Archive(std::io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// A static busybox: becomes /bin/busybox, every applet a hard link to it.
    pub busybox: PathBuf,
    /// The full image name, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// The image's default command (config.Cmd).
    pub cmd: Vec<String>,
    /// Applet names; `None` asks the binary (`busybox --list`).
    pub applets: Option<Vec<String>>,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// `sha256:...` of the manifest: the image's digest as containerd shows it.
    pub manifest_digest: String,
    pub archive_bytes: u64,
    pub applets: usize,
}

/// One entry of the layer. Paths are relative to the image root, without a leading slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntry {
    Dir {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// A hard link to an earlier regular file entry.
    HardLink { path: String, target: String },
}

impl LayerEntry {
    fn path(&self) -> &str {
        match self {
            LayerEntry::Dir { path, .. }
            | LayerEntry::File { path, .. }
            | LayerEntry::HardLink { path, .. } => path,
        }
    }
}

/// The image architecture (GOARCH spelling) from the ELF header of `bin`: the image must say what its
/// binary runs on, whatever the build host is.
pub fn elf_arch(path: &Path, bin: &[u8]) -> Result<Arch, OciError> {
    let bad = |why| OciError::NotExecutable {
        path: path.to_path_buf(),
        why,
    };
    if bin.len() < 20 || &bin[..4] != b"\x7fELF" {
        return Err(bad("no ELF magic"));
    }
    // e_machine is a 16-bit field at offset 18, in the byte order EI_DATA (offset 5) names.
    let machine = match bin[5] {
        1 => u16::from_le_bytes([bin[18], bin[19]]),
        2 => u16::from_be_bytes([bin[18], bin[19]]),
        _ => return Err(bad("unknown ELF byte order")),
    };
    match machine {
        0x3e => Ok(Arch::Amd64),
        0xb7 => Ok(Arch::ARM64),
        0x03 => Ok(Arch::i386),
        0xf3 => Ok(Arch::RISCV64),
        _ => Err(bad("unsupported ELF machine")),
    }
}

/// The applet names `busybox --list` prints, sorted, without duplicates or anything that is not a plain
/// file name.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, OciError> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| OciError::Applets {
            path: busybox.to_path_buf(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(OciError::Applets {
            path: busybox.to_path_buf(),
            why: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let applets = clean_applets(String::from_utf8_lossy(&out.stdout).lines());
    if applets.is_empty() {
        return Err(OciError::Applets {
            path: busybox.to_path_buf(),
            why: "it listed no applets".into(),
        });
    }
    Ok(applets)
}

fn clean_applets<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = names
        .into_iter()
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "." && *n != ".." && *n != "busybox" && !n.contains('/'))
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The layer's entries in archive order: directories and files sorted by path, then the applet hard
/// links sorted by name (a hard link must come after its target, and `[` sorts before `busybox`).
pub fn layer_entries(busybox: Vec<u8>, applets: &[String]) -> Vec<LayerEntry> {
    let dir = |path: &str, mode| LayerEntry::Dir {
        path: path.into(),
        mode,
        uid: 0,
        gid: 0,
    };
    let file = |path: &str, mode, data: &str| LayerEntry::File {
        path: path.into(),
        mode,
        data: data.as_bytes().to_vec(),
    };
    let mut entries = vec![
        dir("bin", 0o755),
        LayerEntry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox,
        },
        dir("dev", 0o755),
        dir("etc", 0o755),
        file("etc/group", 0o644, GROUP),
        file("etc/passwd", 0o644, PASSWD),
        dir("home", 0o755),
        LayerEntry::Dir {
            path: "home/user".into(),
            mode: 0o755,
            uid: 1000,
            gid: 1000,
        },
        dir("proc", 0o555),
        dir("root", 0o700),
        dir("sys", 0o555),
        dir("tmp", 0o1777),
    ];
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    entries.extend(
        clean_applets(applets.iter().map(String::as_str))
            .into_iter()
            .map(|a| LayerEntry::HardLink {
                path: format!("bin/{a}"),
                target: "bin/busybox".into(),
            }),
    );
    entries
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    // ustar (not GNU): plain, and every path here fits its 100-byte name field.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(FIXED_MTIME);
    h.set_size(size);
    h
}

/// The layer as an uncompressed tar.
pub fn layer_tar(entries: &[LayerEntry]) -> Result<Vec<u8>, OciError> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            LayerEntry::Dir {
                path,
                mode,
                uid,
                gid,
            } => {
                let mut h = header(tar::EntryType::Directory, *mode, *uid, *gid, 0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
            }
            LayerEntry::File { path, mode, data } => {
                let mut h = header(tar::EntryType::Regular, *mode, 0, 0, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())
            }
            LayerEntry::HardLink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o755, 0, 0, 0);
                b.append_link(&mut h, path, target)
            }
        }
        .map_err(OciError::Archive)?;
    }
    b.into_inner().map_err(OciError::Archive)
}

/// Splits `name` into the repository and tag (`latest` when none is given).
fn tag_of(name: &str) -> Result<&str, OciError> {
    let bad = |why| OciError::Name {
        name: name.into(),
        why,
    };
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("empty or contains whitespace"));
    }
    if name.contains('@') {
        return Err(bad("a digest reference cannot name a new image"));
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((repo, tag)) if !repo.is_empty() && !tag.is_empty() => Ok(tag),
        Some(_) => Err(bad("empty repository or tag")),
        None => Ok("latest"),
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON with object keys in sorted order: oci-spec keeps annotations in a HashMap, whose order
/// changes from run to run, and the digests must not.
fn canonical_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, OciError> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut pairs: Vec<_> = m.into_iter().collect();
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(pairs.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sort(serde_json::to_value(v)?))?)
}

/// A blob: its bytes and its descriptor.
struct Blob {
    data: Vec<u8>,
    hex: String,
}

impl Blob {
    fn new(data: Vec<u8>) -> Self {
        let hex = sha256_hex(&data);
        Blob { data, hex }
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor, OciError> {
        Ok(Descriptor::new(
            media_type,
            self.data.len() as u64,
            Sha256Digest::from_str(&self.hex)?,
        ))
    }
}

/// The whole OCI image layout archive in memory (a few MiB for busybox), and its manifest digest.
pub fn image_archive(
    busybox_path: &Path,
    busybox: Vec<u8>,
    applets: &[String],
    name: &str,
    cmd: &[String],
) -> Result<(Vec<u8>, String), OciError> {
    let tag = tag_of(name)?;
    let arch = elf_arch(busybox_path, &busybox)?;
    // The layer is stored uncompressed, so its digest is also its diff_id.
    let layer = Blob::new(layer_tar(&layer_entries(busybox, applets))?);
    let diff_id = format!("sha256:{}", layer.hex);

    let config = ImageConfigurationBuilder::default()
        .architecture(arch.clone())
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .cmd(cmd.to_vec())
                .env(vec![IMAGE_PATH_ENV.to_string()])
                .working_dir("/")
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .build()?;
    let config = Blob::new(canonical_json(&config)?);

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor(MediaType::ImageConfig)?)
        .layers(vec![layer.descriptor(MediaType::ImageLayer)?])
        .build()?;
    let manifest = Blob::new(canonical_json(&manifest)?);

    let annotations = HashMap::from([
        ("io.containerd.image.name".to_string(), name.to_string()),
        (
            "org.opencontainers.image.ref.name".to_string(),
            tag.to_string(),
        ),
    ]);
    let mut manifest_desc = manifest.descriptor(MediaType::ImageManifest)?;
    manifest_desc.set_annotations(Some(annotations));
    manifest_desc.set_platform(Some(
        PlatformBuilder::default()
            .architecture(arch)
            .os(Os::Linux)
            .build()?,
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    let index = canonical_json(&index)?;
    let layout = canonical_json(&serde_json::json!({"imageLayoutVersion": "1.0.0"}))?;

    // The outer archive, in sorted path order.
    let mut files: Vec<(String, &[u8])> = vec![
        ("index.json".into(), &index),
        ("oci-layout".into(), &layout),
    ];
    for blob in [&layer, &config, &manifest] {
        files.push((format!("blobs/sha256/{}", blob.hex), &blob.data));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0, 0, 0);
        b.append_data(&mut h, dir, std::io::empty())
            .map_err(OciError::Archive)?;
    }
    for (path, data) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, data.len() as u64);
        b.append_data(&mut h, path, data)
            .map_err(OciError::Archive)?;
    }
    let archive = b.into_inner().map_err(OciError::Archive)?;
    Ok((archive, format!("sha256:{}", manifest.hex)))
}

/// Builds the image archive at `out` (written to a temporary file, then renamed into place).
pub fn build_oci_image(opts: &ImageOptions, out: &Path) -> Result<ImageSummary, OciError> {
    let busybox = std::fs::read(&opts.busybox).map_err(|source| OciError::Read {
        path: opts.busybox.clone(),
        source,
    })?;
    elf_arch(&opts.busybox, &busybox)?;
    let applets = match &opts.applets {
        Some(a) => clean_applets(a.iter().map(String::as_str)),
        None => busybox_applets(&opts.busybox)?,
    };
    let (archive, manifest_digest) =
        image_archive(&opts.busybox, busybox, &applets, &opts.name, &opts.cmd)?;
    let werr = |source| OciError::Write {
        path: out.to_path_buf(),
        source,
    };
    let tmp = out.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(werr)?;
    f.write_all(&archive).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, out).map_err(werr)?;
    Ok(ImageSummary {
        manifest_digest,
        archive_bytes: archive.len() as u64,
        applets: applets.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The first bytes of a little-endian x86-64 ELF file, enough for `elf_arch`.
    fn fake_busybox() -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little endian
        b[18] = 0x3e;
        b.extend_from_slice(b"fake busybox body");
        b
    }

    fn applets() -> Vec<String> {
        ["sh", "ls", "[", "cat", "id", "sh", "../evil", "busybox", ""]
            .map(String::from)
            .to_vec()
    }

    fn build() -> (Vec<u8>, String) {
        image_archive(
            Path::new("fake"),
            fake_busybox(),
            &applets(),
            "docker.io/library/busybox:latest",
            &["sh".to_string()],
        )
        .unwrap()
    }

    /// (path, entry type, mode, uid, gid, mtime, link name, data) of every entry.
    type TarRow = (String, tar::EntryType, u32, u64, u64, u64, String, Vec<u8>);

    fn read_tar(bytes: &[u8]) -> Vec<TarRow> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                    e.link_name()
                        .unwrap()
                        .map(|l| l.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    data,
                )
            })
            .collect()
    }

    fn blob<'a>(outer: &'a [TarRow], digest: &str) -> &'a [u8] {
        let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let row = outer.iter().find(|r| r.0 == path).expect("blob present");
        assert_eq!(sha256_hex(&row.7), digest.trim_start_matches("sha256:"));
        &row.7
    }

    #[test]
    fn archive_is_reproducible() {
        let (a, da) = build();
        let (b, db) = build();
        assert_eq!(da, db);
        assert!(a == b, "two builds differ");
    }

    #[test]
    fn layout_index_manifest_config_and_layer_fit_together() {
        let (bytes, manifest_digest) = build();
        let outer = read_tar(&bytes);
        let names: Vec<&str> = outer.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(&names[..2], &["blobs/", "blobs/sha256/"]);
        assert!(names.contains(&"oci-layout") && names.contains(&"index.json"));
        assert!(outer.iter().all(|r| r.5 == FIXED_MTIME && r.3 == 0));

        let layout: serde_json::Value =
            serde_json::from_slice(&outer.iter().find(|r| r.0 == "oci-layout").unwrap().7).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");

        let index_raw = &outer.iter().find(|r| r.0 == "index.json").unwrap().7;
        let index: oci_spec::image::ImageIndex = serde_json::from_slice(index_raw).unwrap();
        assert_eq!(index.manifests().len(), 1);
        let m = &index.manifests()[0];
        assert_eq!(m.media_type(), &MediaType::ImageManifest);
        assert_eq!(m.digest().to_string(), manifest_digest);
        let ann = m.annotations().as_ref().unwrap();
        assert_eq!(
            ann["io.containerd.image.name"],
            "docker.io/library/busybox:latest"
        );
        assert_eq!(ann["org.opencontainers.image.ref.name"], "latest");
        let platform = m.platform().as_ref().unwrap();
        assert_eq!(platform.architecture(), &Arch::Amd64);
        assert_eq!(platform.os(), &Os::Linux);

        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(blob(&outer, &manifest_digest)).unwrap();
        assert_eq!(m.size(), blob(&outer, &manifest_digest).len() as u64);
        assert_eq!(manifest.config().media_type(), &MediaType::ImageConfig);
        let config_raw = blob(&outer, manifest.config().digest().as_ref());
        let config: oci_spec::image::ImageConfiguration =
            serde_json::from_slice(config_raw).unwrap();
        assert_eq!(config.architecture(), &Arch::Amd64);
        assert_eq!(config.os(), &Os::Linux);
        let c = config.config().as_ref().unwrap();
        assert_eq!(c.cmd().as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(c.env().as_deref(), Some(&[IMAGE_PATH_ENV.to_string()][..]));

        assert_eq!(manifest.layers().len(), 1);
        let l = &manifest.layers()[0];
        assert_eq!(
            l.media_type().to_string(),
            "application/vnd.oci.image.layer.v1.tar"
        );
        let layer = blob(&outer, l.digest().as_ref());
        assert_eq!(l.size(), layer.len() as u64);
        // Uncompressed: the diff_id is the layer digest.
        assert_eq!(config.rootfs().diff_ids(), &vec![l.digest().to_string()]);
        assert_eq!(config.rootfs().typ(), "layers");
    }

    #[test]
    fn layer_has_busybox_hard_links_users_and_dirs() {
        let (bytes, manifest_digest) = build();
        let outer = read_tar(&bytes);
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(blob(&outer, &manifest_digest)).unwrap();
        let layer = read_tar(blob(&outer, manifest.layers()[0].digest().as_ref()));
        let get = |p: &str| {
            layer
                .iter()
                .find(|r| r.0 == p)
                .unwrap_or_else(|| panic!("{p} missing"))
        };
        let pos = |p: &str| layer.iter().position(|r| r.0 == p).unwrap();

        let bb = get("bin/busybox");
        assert_eq!((bb.1, bb.2), (tar::EntryType::Regular, 0o755));
        assert_eq!(bb.7, fake_busybox());
        // Hard links (not symlinks), after their target; bad names dropped, duplicates merged.
        let links: Vec<&str> = layer
            .iter()
            .filter(|r| r.1 == tar::EntryType::Link)
            .map(|r| r.0.as_str())
            .collect();
        assert_eq!(links, ["bin/[", "bin/cat", "bin/id", "bin/ls", "bin/sh"]);
        assert!(layer
            .iter()
            .filter(|r| r.1 == tar::EntryType::Link)
            .all(|r| r.6 == "bin/busybox" && pos(&r.0) > pos("bin/busybox")));
        assert!(!layer.iter().any(|r| r.1 == tar::EntryType::Symlink));

        let passwd = String::from_utf8(get("etc/passwd").7.clone()).unwrap();
        assert!(passwd.contains("root:x:0:0:"));
        assert!(passwd.contains("user:x:1000:1000:user:/home/user:"));
        let group = String::from_utf8(get("etc/group").7.clone()).unwrap();
        assert!(group.contains("user:x:1000:") && group.contains("extra:x:2000:user"));

        let tmp = get("tmp/");
        assert_eq!((tmp.1, tmp.2), (tar::EntryType::Directory, 0o1777));
        let home = get("home/user/");
        assert_eq!((home.2, home.3, home.4), (0o755, 1000, 1000));
        assert_eq!(get("root/").2, 0o700);
        for d in ["proc/", "sys/", "dev/", "etc/", "bin/", "home/"] {
            assert_eq!(get(d).1, tar::EntryType::Directory, "{d}");
        }
        assert!(pos("home/") < pos("home/user/") && pos("bin/") < pos("bin/busybox"));
        assert!(layer.iter().all(|r| r.5 == FIXED_MTIME));
    }

    #[test]
    fn names_and_binaries_are_checked() {
        assert_eq!(
            tag_of("docker.io/library/busybox:latest").unwrap(),
            "latest"
        );
        assert_eq!(tag_of("localhost:5000/busybox").unwrap(), "latest");
        assert_eq!(tag_of("localhost:5000/busybox:v1").unwrap(), "v1");
        for bad in ["", "a b:c", "busybox@sha256:00", "busybox:", ":x"] {
            assert!(matches!(tag_of(bad), Err(OciError::Name { .. })), "{bad}");
        }
        assert!(matches!(
            elf_arch(Path::new("x"), b"#!/bin/sh\necho not elf\n"),
            Err(OciError::NotExecutable { .. })
        ));
        let mut arm = fake_busybox();
        arm[18] = 0xb7;
        assert_eq!(elf_arch(Path::new("x"), &arm).unwrap(), Arch::ARM64);
    }

    #[test]
    fn builds_from_the_host_busybox_when_present() {
        // The real thing when busybox-static is installed (`make deps`); the tests above cover the
        // format without it.
        let bb = Path::new("/bin/busybox");
        if !bb.is_file() {
            eprintln!("no /bin/busybox here: skipping the real-binary check");
            return;
        }
        let d = std::env::temp_dir().join(format!("husk-oci-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let opts = ImageOptions {
            busybox: bb.into(),
            name: "docker.io/library/busybox:latest".into(),
            cmd: vec!["sh".into()],
            applets: None,
        };
        let a = build_oci_image(&opts, &d.join("a.tar")).unwrap();
        let b = build_oci_image(&opts, &d.join("b.tar")).unwrap();
        assert_eq!(a, b);
        assert!(a.applets > 50, "{a:?}");
        assert_eq!(
            std::fs::read(d.join("a.tar")).unwrap(),
            std::fs::read(d.join("b.tar")).unwrap()
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
