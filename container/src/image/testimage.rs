//! A small test image built from the host's busybox-static, written in each format `rvmm run`
//! reads, without any registry. Two layers: the upper one deletes a file of the lower one
//! (whiteout), replaces a directory's content (opaque) and adds a file.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The static busybox Debian's busybox-static installs.
pub const BUSYBOX: &str = "/bin/busybox";
/// In the lower layer, deleted by the upper one.
pub const WHITED_OUT: &str = "etc/removed-by-upper";
/// In the lower layer's etc/opaque, hidden by the upper layer's opaque marker.
pub const HIDDEN_BY_OPAQUE: &str = "etc/opaque/lower";
/// Added by the upper layer.
pub const ADDED_BY_UPPER: &str = "etc/opaque/upper";
/// An environment variable the image config sets.
pub const IMAGE_ENV: &str = "IMAGE_VAR=from-image";

#[derive(Debug, thiserror::Error)]
pub enum TestImageError {
    #[error("{BUSYBOX} is missing (install busybox-static)")]
    NoBusybox(#[source] io::Error),
    #[error("cannot write the test image")]
    Write(#[source] io::Error),
}

/// The layers (uncompressed tars) and the image config.
pub struct TestImage {
    pub layers: Vec<Vec<u8>>,
    pub config: serde_json::Value,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> io::Result<()> {
    b.append_data(
        &mut header(tar::EntryType::Directory, mode, 0),
        path,
        io::empty(),
    )
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data)
}

fn lower_layer(busybox: &[u8]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [("bin", 0o755), ("etc", 0o755), ("etc/opaque", 0o755)] {
        add_dir(&mut b, dir, mode)?;
    }
    add_dir(&mut b, "root", 0o700)?;
    add_dir(&mut b, "tmp", 0o1777)?;
    add_file(&mut b, "bin/busybox", 0o755, busybox)?;
    for applet in [
        "sh", "echo", "cat", "wc", "ps", "ls", "env", "id", "pwd", "sleep", "true", "httpd", "nc",
        "tty", "stty", "timeout",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
    add_file(&mut b, "etc/passwd", 0o644, passwd)?;
    add_file(&mut b, "etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    add_file(&mut b, WHITED_OUT, 0o644, b"lower\n")?;
    add_file(&mut b, HIDDEN_BY_OPAQUE, 0o644, b"lower\n")?;
    b.into_inner()
}

fn upper_layer() -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let (dir, name) = WHITED_OUT.rsplit_once('/').unwrap_or(("", WHITED_OUT));
    add_file(&mut b, &format!("{dir}/.wh.{name}"), 0o644, b"")?;
    add_file(&mut b, "etc/opaque/.wh..wh..opq", 0o644, b"")?;
    add_file(&mut b, ADDED_BY_UPPER, 0o644, b"upper\n")?;
    b.into_inner()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(data)?;
    gz.finish()
}

impl TestImage {
    pub fn busybox() -> Result<TestImage, TestImageError> {
        let busybox = fs::read(BUSYBOX).map_err(TestImageError::NoBusybox)?;
        let layers = vec![
            lower_layer(&busybox).map_err(TestImageError::Write)?,
            upper_layer().map_err(TestImageError::Write)?,
        ];
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| format!("sha256:{}", sha256_hex(l)))
            .collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", IMAGE_ENV],
                "Cmd": ["echo", "default command"],
                "WorkingDir": "/root",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        Ok(TestImage { layers, config })
    }

    /// An OCI image layout directory; the lower layer is stored gzipped.
    pub fn write_oci_layout(&self, dir: &Path) -> Result<(), TestImageError> {
        self.oci_layout(dir).map_err(TestImageError::Write)
    }

    fn oci_layout(&self, dir: &Path) -> io::Result<()> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        let put = |data: &[u8]| -> io::Result<serde_json::Value> {
            let hex = sha256_hex(data);
            fs::write(blobs.join(&hex), data)?;
            Ok(json!(format!("sha256:{hex}")))
        };
        let mut layers = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (data, media) = if i == 0 {
                (gzip(layer)?, "application/vnd.oci.image.layer.v1.tar+gzip")
            } else {
                (layer.clone(), "application/vnd.oci.image.layer.v1.tar")
            };
            layers.push(json!({"mediaType": media, "size": data.len(), "digest": put(&data)?}));
        }
        let config = serde_json::to_vec(&self.config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": config.len(),
                "digest": put(&config)?,
            },
            "layers": layers,
        }))?;
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "size": manifest.len(),
                "digest": put(&manifest)?,
            }],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
    }

    /// The OCI layout as one tar (`podman save --format oci-archive`).
    pub fn write_oci_archive(&self, path: &Path) -> Result<(), TestImageError> {
        let dir = vmm_sys_util::tempdir::TempDir::new()
            .map_err(|e| TestImageError::Write(io::Error::from_raw_os_error(e.errno())))?;
        self.write_oci_layout(dir.as_path())?;
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", dir.as_path())
            .map_err(TestImageError::Write)?;
        let data = b.into_inner().map_err(TestImageError::Write)?;
        fs::write(path, data).map_err(TestImageError::Write)
    }

    /// A `docker save` tarball: manifest.json, `<config hex>.json`, `<n>/layer.tar`.
    pub fn write_docker_save(&self, path: &Path) -> Result<(), TestImageError> {
        self.docker_save(path).map_err(TestImageError::Write)
    }

    fn docker_save(&self, path: &Path) -> io::Result<()> {
        let mut b = tar::Builder::new(Vec::new());
        let config = serde_json::to_vec(&self.config)?;
        let config_name = format!("{}.json", sha256_hex(&config));
        add_file(&mut b, &config_name, 0o644, &config)?;
        let mut layer_names = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let name = format!("layer{i}/layer.tar");
            add_file(&mut b, &name, 0o644, layer)?;
            layer_names.push(name);
        }
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": ["rvmm-test:latest"],
            "Layers": layer_names,
        }]);
        add_file(
            &mut b,
            "manifest.json",
            0o644,
            &serde_json::to_vec(&manifest)?,
        )?;
        fs::write(path, b.into_inner()?)
    }

    /// The lower layer alone as a rootfs tarball (`docker export`).
    pub fn write_rootfs_tar(&self, path: &Path) -> Result<(), TestImageError> {
        fs::write(path, &self.layers[0]).map_err(TestImageError::Write)
    }
}
