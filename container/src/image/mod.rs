//! Container images from local files, never from a registry: an OCI image layout directory
//! or its tar (`skopeo copy … oci:`, `podman save --format oci-archive`), a `docker save`
//! tarball (or its unpacked directory), or a plain rootfs tarball (`docker export`).
//! Every blob is checked against its digest before anything from it is used.

pub mod disk;
mod known;
pub mod layer;
pub mod testimage;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use oci_spec::image::{Digest, DigestAlgorithm, ImageConfiguration, ImageIndex, MediaType};
use sha2::{Digest as _, Sha256};
use vmm_sys_util::tempdir::TempDir;

pub use layer::Owners;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("{0}: unknown image format (expected an OCI layout directory or tar, a docker save tar, or a rootfs tar)")]
    UnknownFormat(PathBuf),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
    #[error("missing blob {0}")]
    MissingBlob(String),
    #[error("digest mismatch for {what}: expected {expected}, got sha256:{actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("unsupported {0}")]
    Unsupported(String),
    #[error("cannot read a layer")]
    Layer(#[source] io::Error),
    #[error(transparent)]
    Apply(#[from] layer::LayerError),
}

/// What the image config says about running it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// What a layer's bytes must hash to.
#[derive(Clone, Debug)]
enum Check {
    /// sha256 of the stored (maybe compressed) blob: OCI descriptors.
    Blob(String),
    /// sha256 of the uncompressed tar: docker save's diff_ids.
    Diff(String),
    /// The whole file is what the image digest was taken over (rootfs tar).
    None,
}

#[derive(Clone, Debug)]
struct LayerSource {
    path: PathBuf,
    check: Check,
}

/// An image ready to unpack.
#[derive(Debug)]
pub struct Image {
    /// `sha256:<hex>` naming the content: the manifest (OCI), the config (docker), the file
    /// (rootfs tar).
    pub digest: String,
    pub settings: Settings,
    layers: Vec<LayerSource>,
    // An archive's extracted blobs live until the layers have been applied.
    _extracted: Option<TempDir>,
}

impl Image {
    /// Reads and verifies an image's metadata; archives are extracted under `scratch`.
    pub fn open(path: &Path, scratch: &Path) -> Result<Image, ImageError> {
        let meta = fs::metadata(path).map_err(|e| ImageError::Open(path.into(), e))?;
        if meta.is_dir() {
            return open_dir(path, None);
        }
        let names = tar_names(path)?;
        let top = |n: &str| names.iter().any(|x| x.trim_start_matches("./") == n);
        if top("index.json") || top("manifest.json") {
            let tmp = extract(path, scratch)?;
            let dir = tmp.as_path().to_path_buf();
            return open_dir(&dir, Some(tmp));
        }
        let file = File::open(path).map_err(|e| ImageError::Open(path.into(), e))?;
        Ok(Image {
            digest: format!("sha256:{}", sha256_of(file).map_err(ImageError::Layer)?),
            settings: Settings::default(),
            layers: vec![LayerSource {
                path: path.into(),
                check: Check::None,
            }],
            _extracted: None,
        })
    }

    /// Applies every layer in order to `root`, verifying each as it is read.
    pub fn unpack(&self, root: &Path, owners: &mut Owners) -> Result<(), ImageError> {
        for layer in &self.layers {
            apply_layer(layer, root, owners)?;
        }
        Ok(())
    }
}

/// Reads through `inner`, hashing every byte.
struct HashReader<'a, R> {
    inner: R,
    hasher: &'a mut Sha256,
}

impl<R: Read> Read for HashReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_of(mut input: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut input, &mut hasher)?;
    Ok(hex(hasher))
}

fn verify(what: &str, expected: &str, actual: String) -> Result<(), ImageError> {
    if expected.strip_prefix("sha256:") == Some(actual.as_str()) {
        return Ok(());
    }
    Err(ImageError::DigestMismatch {
        what: what.into(),
        expected: expected.into(),
        actual,
    })
}

/// A tar stream, decompressed when it starts with the gzip magic.
fn tar_stream<'a>(raw: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::new(raw);
    if buf.fill_buf()?.starts_with(&GZIP_MAGIC) {
        Ok(Box::new(MultiGzDecoder::new(buf)))
    } else {
        Ok(Box::new(buf))
    }
}

fn apply_layer(layer: &LayerSource, root: &Path, owners: &mut Owners) -> Result<(), ImageError> {
    let file = File::open(&layer.path)
        .map_err(|_| ImageError::MissingBlob(layer.path.display().to_string()))?;
    let (mut blob_hash, mut diff_hash) = (Sha256::new(), Sha256::new());
    {
        let raw = HashReader {
            inner: file,
            hasher: &mut blob_hash,
        };
        let mut diff = HashReader {
            inner: tar_stream(raw).map_err(ImageError::Layer)?,
            hasher: &mut diff_hash,
        };
        layer::apply(&mut diff, root, owners)?;
        // The tar reader stops at the end-of-archive marker; the digest covers everything.
        io::copy(&mut diff, &mut io::sink()).map_err(ImageError::Layer)?;
    }
    let what = format!("layer {}", layer.path.display());
    match &layer.check {
        Check::Blob(expected) => verify(&what, expected, hex(blob_hash)),
        Check::Diff(expected) => verify(&what, expected, hex(diff_hash)),
        Check::None => Ok(()),
    }
}

/// Names of the entries of a tar (maybe gzipped); an error when it is not a tar at all.
fn tar_names(path: &Path) -> Result<Vec<String>, ImageError> {
    let unknown = || ImageError::UnknownFormat(path.into());
    let file = File::open(path).map_err(|e| ImageError::Open(path.into(), e))?;
    let mut stream = tar_stream(file).map_err(|e| ImageError::Open(path.into(), e))?;
    let mut first = [0u8; 512];
    stream.read_exact(&mut first).map_err(|_| unknown())?;
    // POSIX ("ustar\0") and GNU ("ustar ") headers both carry this at offset 257.
    if &first[257..262] != b"ustar" {
        return Err(unknown());
    }
    let mut archive = tar::Archive::new(first.chain(stream));
    let mut names = Vec::new();
    for entry in archive.entries().map_err(|_| unknown())? {
        let entry = entry.map_err(|e| ImageError::Open(path.into(), e))?;
        names.push(entry.path().map_err(|_| unknown())?.display().to_string());
    }
    Ok(names)
}

fn extract(path: &Path, scratch: &Path) -> Result<TempDir, ImageError> {
    let failed = |e| ImageError::Open(path.into(), e);
    fs::create_dir_all(scratch).map_err(failed)?;
    let tmp =
        TempDir::new_in(scratch).map_err(|e| failed(io::Error::from_raw_os_error(e.errno())))?;
    let file = File::open(path).map_err(failed)?;
    let mut archive = tar::Archive::new(tar_stream(file).map_err(failed)?);
    archive.unpack(tmp.as_path()).map_err(failed)?;
    Ok(tmp)
}

fn open_dir(dir: &Path, extracted: Option<TempDir>) -> Result<Image, ImageError> {
    let mut image = if dir.join("index.json").is_file() {
        open_oci(dir)?
    } else if dir.join("manifest.json").is_file() {
        open_docker(dir)?
    } else {
        return Err(ImageError::UnknownFormat(dir.into()));
    };
    image._extracted = extracted;
    Ok(image)
}

/// A blob of an OCI layout, verified against its digest.
fn read_blob(dir: &Path, digest: &Digest) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(dir, digest)?;
    let data = fs::read(&path).map_err(|_| ImageError::MissingBlob(digest.to_string()))?;
    verify(
        &format!("blob {digest}"),
        digest.as_ref(),
        sha256_of(data.as_slice()).map_err(ImageError::Layer)?,
    )?;
    Ok(data)
}

fn blob_path(dir: &Path, digest: &Digest) -> Result<PathBuf, ImageError> {
    if *digest.algorithm() != DigestAlgorithm::Sha256 {
        return Err(ImageError::Unsupported(format!(
            "digest algorithm in {digest}"
        )));
    }
    Ok(dir.join("blobs/sha256").join(digest.digest()))
}

fn is_manifest(media: &MediaType) -> bool {
    match media {
        MediaType::ImageManifest => true,
        MediaType::Other(m) => m == DOCKER_MANIFEST,
        _ => false,
    }
}

fn is_index(media: &MediaType) -> bool {
    match media {
        MediaType::ImageIndex => true,
        MediaType::Other(m) => m == DOCKER_LIST,
        _ => false,
    }
}

/// The manifest descriptor to use: the only one, or the linux/amd64 one; nested indexes are
/// followed.
fn pick_manifest(dir: &Path, index: &ImageIndex, depth: u32) -> Result<Digest, ImageError> {
    let invalid = |m: &str| ImageError::Invalid(dir.into(), m.into());
    let usable: Vec<_> = index
        .manifests()
        .iter()
        .filter(|d| is_manifest(d.media_type()) || is_index(d.media_type()))
        .filter(|d| {
            d.platform().as_ref().is_none_or(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
            })
        })
        .collect();
    let desc = match usable.as_slice() {
        [one] => *one,
        [] => return Err(invalid("no linux/amd64 image manifest in index.json")),
        _ => return Err(invalid("index.json lists several images; keep only one")),
    };
    if is_index(desc.media_type()) {
        if depth > 0 {
            return Err(invalid("image indexes nested too deeply"));
        }
        let nested = ImageIndex::from_reader(read_blob(dir, desc.digest())?.as_slice())
            .map_err(|e| invalid(&format!("index {}: {e}", desc.digest())))?;
        return pick_manifest(dir, &nested, depth + 1);
    }
    Ok(desc.digest().clone())
}

fn open_oci(dir: &Path) -> Result<Image, ImageError> {
    let invalid = |m: String| ImageError::Invalid(dir.into(), m);
    let index = ImageIndex::from_file(dir.join("index.json"))
        .map_err(|e| invalid(format!("index.json: {e}")))?;
    let manifest_digest = pick_manifest(dir, &index, 0)?;
    let manifest =
        oci_spec::image::ImageManifest::from_reader(read_blob(dir, &manifest_digest)?.as_slice())
            .map_err(|e| invalid(format!("manifest {manifest_digest}: {e}")))?;
    let config = config_from(dir, &read_blob(dir, manifest.config().digest())?)?;
    let mut layers = Vec::new();
    for desc in manifest.layers() {
        if let MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd =
            desc.media_type()
        {
            return Err(ImageError::Unsupported(format!(
                "zstd-compressed layer {}",
                desc.digest()
            )));
        }
        layers.push(LayerSource {
            path: blob_path(dir, desc.digest())?,
            check: Check::Blob(desc.digest().to_string()),
        });
    }
    Ok(Image {
        digest: manifest_digest.to_string(),
        settings: settings_of(&config),
        layers,
        _extracted: None,
    })
}

/// One image of a docker save archive's manifest.json.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    layers: Vec<String>,
}

/// A path from manifest.json, which must stay inside the archive.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(ImageError::Invalid(
            dir.into(),
            format!("manifest.json names {rel:?}"),
        ));
    }
    Ok(dir.join(p))
}

fn open_docker(dir: &Path) -> Result<Image, ImageError> {
    let invalid = |m: String| ImageError::Invalid(dir.into(), m);
    let manifest = fs::read(dir.join("manifest.json"))
        .map_err(|e| ImageError::Open(dir.join("manifest.json"), e))?;
    let images: Vec<DockerImage> =
        serde_json::from_slice(&manifest).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let image = match images.as_slice() {
        [one] => one,
        [] => return Err(invalid("manifest.json lists no image".into())),
        _ => return Err(invalid("manifest.json lists several images".into())),
    };
    let config_bytes = fs::read(inside(dir, &image.config)?)
        .map_err(|_| ImageError::MissingBlob(image.config.clone()))?;
    let digest = sha256_of(config_bytes.as_slice()).map_err(ImageError::Layer)?;
    // The config's file name is its digest ("<hex>.json" or "blobs/sha256/<hex>").
    let named = Path::new(&image.config)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
    if let Some(named) = named {
        verify(
            &format!("config {}", image.config),
            &format!("sha256:{named}"),
            digest.clone(),
        )?;
    }
    let config = config_from(dir, &config_bytes)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != image.layers.len() {
        return Err(invalid(format!(
            "{} layers but the config lists {} diff_ids",
            image.layers.len(),
            diff_ids.len()
        )));
    }
    let layers = image
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(path, diff)| {
            Ok(LayerSource {
                path: inside(dir, path)?,
                check: Check::Diff(diff.clone()),
            })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Image {
        digest: format!("sha256:{digest}"),
        settings: settings_of(&config),
        layers,
        _extracted: None,
    })
}

fn config_from(dir: &Path, bytes: &[u8]) -> Result<ImageConfiguration, ImageError> {
    ImageConfiguration::from_reader(bytes)
        .map_err(|e| ImageError::Invalid(dir.into(), format!("image config: {e}")))
}

fn settings_of(config: &ImageConfiguration) -> Settings {
    let Some(c) = config.config() else {
        return Settings::default();
    };
    Settings {
        env: c.env().clone().unwrap_or_default(),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
