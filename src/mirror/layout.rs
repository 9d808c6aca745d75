//! OCI image layouts (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) as a directory or as
//! an OCI archive: a plain (uncompressed) tar of the same files.
//!
//! Archives are written and read with the `tar` crate. Reading an archive never unpacks it:
//! its entries are indexed once (name → offset and size in the file), and blobs are streamed
//! from their place in the tar, which is possible because the tar is not compressed.
//! Writing into an archive goes through a staging directory beside it (`<PATH>.partial`),
//! so an interrupted pull resumes from what that directory holds; the archive itself is
//! written last, to a temporary name, then renamed.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use oci_spec::image::{Descriptor, Digest, ImageIndex};
use tokio::io::AsyncWriteExt;

use crate::oci::verify::{VerifiedStream, digest_like};

/// The file every layout starts with.
pub const OCI_LAYOUT_FILE: &str = "oci-layout";
const OCI_LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
pub const INDEX_FILE: &str = "index.json";
/// The annotation holding an image's name in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's annotation for the full image name (`ctr export` writes it).
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Whether PATH names an archive rather than a directory.
pub fn is_archive(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

/// Relative path of a blob in a layout.
pub fn blob_path(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm(), digest.digest())
}

/// Where a layout's files are read from.
enum Files {
    Dir(PathBuf),
    /// Path of the tar, and each regular file's (offset, size) in it.
    Tar(PathBuf, HashMap<String, (u64, u64)>),
}

/// A layout or archive opened for reading (`mirror push`).
pub struct LayoutReader {
    path: PathBuf,
    files: Files,
    index: ImageIndex,
}

impl LayoutReader {
    /// Opens a layout directory, or an archive when `path` ends in `.tar`, and reads its
    /// `index.json`.
    pub fn open(path: &Path) -> Result<LayoutReader, String> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("layout {shown}: not found"),
            _ => format!("layout {shown}: {e}"),
        })?;
        let files = if meta.is_dir() {
            Files::Dir(path.to_path_buf())
        } else if is_archive(path) || meta.is_file() {
            Files::Tar(path.to_path_buf(), index_tar(path)?)
        } else {
            return Err(format!(
                "layout {shown}: neither a directory nor an archive"
            ));
        };
        let mut reader = LayoutReader {
            path: path.to_path_buf(),
            files,
            index: ImageIndex::default(),
        };
        let index = reader
            .read_small(INDEX_FILE, 16 * 1024 * 1024)
            .map_err(|e| format!("layout {shown}: {INDEX_FILE} {e}: not an OCI image layout"))?;
        reader.index = serde_json::from_slice(&index)
            .map_err(|e| format!("layout {shown}: {INDEX_FILE} is corrupt: {e}"))?;
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn index(&self) -> &ImageIndex {
        &self.index
    }

    fn read_small(&self, name: &str, limit: u64) -> Result<Vec<u8>, String> {
        let (file, size) = self.open_file(name)?;
        if size > limit {
            return Err(format!("is larger than {limit} bytes"));
        }
        let mut out = Vec::with_capacity(size as usize);
        file.take(size)
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot be read: {e}"))?;
        Ok(out)
    }

    /// The file positioned at its start, and its size.
    fn open_file(&self, name: &str) -> Result<(std::fs::File, u64), String> {
        match &self.files {
            Files::Dir(dir) => {
                let file = std::fs::File::open(dir.join(name)).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => "missing".to_string(),
                    _ => format!("cannot be opened: {e}"),
                })?;
                let size = file
                    .metadata()
                    .map_err(|e| format!("cannot be read: {e}"))?
                    .len();
                Ok((file, size))
            }
            Files::Tar(tar, entries) => {
                let (offset, size) = *entries.get(name).ok_or("missing")?;
                let mut file =
                    std::fs::File::open(tar).map_err(|e| format!("cannot be opened: {e}"))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| format!("cannot be read: {e}"))?;
                Ok((file, size))
            }
        }
    }

    /// A small blob (a manifest), checked against its digest.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Bytes, String> {
        let what = format!("layout {}: blob {digest}", self.path.display());
        let bytes = self
            .read_small(&blob_path(digest), limit)
            .map_err(|e| format!("{what} {e}"))?;
        match digest_like(digest, &bytes) {
            Some(actual) if actual != digest.as_ref() => Err(format!(
                "{what} does not match its digest (content is {actual})"
            )),
            None => Err(format!("{what}: digest algorithm not supported")),
            Some(_) => Ok(Bytes::from(bytes)),
        }
    }

    /// Size of a blob, when the layout holds it.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.open_file(&blob_path(digest)).ok().map(|(_, s)| s)
    }

    /// A blob's bytes as a stream checked against its digest: a blob whose content does not
    /// match ends in an error before its last byte.
    pub fn blob_stream(
        &self,
        digest: &Digest,
    ) -> Result<(VerifiedStream, crate::oci::verify::VerifyReport, u64), String> {
        let (file, size) = self
            .open_file(&blob_path(digest))
            .map_err(|e| format!("layout {}: blob {digest} {e}", self.path.display()))?;
        let file = tokio::fs::File::from_std(file);
        use tokio::io::AsyncReadExt;
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(size), 256 * 1024);
        let (verified, report) = VerifiedStream::from_io(stream, digest.clone(), Some(size));
        Ok((verified, report, size))
    }
}

/// Every regular file of a tar: name (without a leading `./`) → (data offset, size).
fn index_tar(path: &Path) -> Result<HashMap<String, (u64, u64)>, String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("layout {shown}: {e}"))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut out = HashMap::new();
    // Seeking over each entry's data: indexing reads the headers only, not the blobs.
    let entries = archive
        .entries_with_seek()
        .map_err(|e| format!("layout {shown}: not a tar archive: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("layout {shown}: corrupt tar archive: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| format!("layout {shown}: corrupt tar archive: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        out.insert(name, (entry.raw_file_position(), entry.size()));
    }
    if out.is_empty() {
        return Err(format!(
            "layout {shown}: not a tar archive, or an empty one"
        ));
    }
    Ok(out)
}

/// A layout directory being written (`mirror pull`).
pub struct LayoutWriter {
    dir: PathBuf,
    /// Where the finished layout goes as an archive, when PATH is one.
    archive: Option<PathBuf>,
    index: std::sync::Mutex<ImageIndex>,
}

impl LayoutWriter {
    /// Opens or creates the layout at `path`, keeping what it already holds. For an
    /// archive, the staging directory `<path>.partial` is used (and filled from an existing
    /// archive first).
    pub fn open(path: &Path) -> Result<LayoutWriter, String> {
        let (dir, archive) = if is_archive(path) {
            let mut staging = path.as_os_str().to_owned();
            staging.push(".partial");
            // A fixed name, so that a rerun finds what an interrupted one left.
            let staging = PathBuf::from(staging);
            if !staging.exists() && path.exists() {
                unpack(path, &staging)?;
            }
            (staging, Some(path.to_path_buf()))
        } else {
            (path.to_path_buf(), None)
        };
        let shown = dir.display();
        std::fs::create_dir_all(dir.join("blobs"))
            .map_err(|e| format!("layout {shown}: cannot create: {e}"))?;
        let layout_file = dir.join(OCI_LAYOUT_FILE);
        if !layout_file.exists() {
            std::fs::write(&layout_file, OCI_LAYOUT_CONTENT)
                .map_err(|e| format!("layout {shown}: cannot write {OCI_LAYOUT_FILE}: {e}"))?;
        }
        let index = match std::fs::read(dir.join(INDEX_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("layout {shown}: {INDEX_FILE} is corrupt: {e}"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => empty_index(),
            Err(e) => return Err(format!("layout {shown}: {INDEX_FILE}: {e}")),
        };
        Ok(LayoutWriter {
            dir,
            archive,
            index: std::sync::Mutex::new(index),
        })
    }

    /// The path as given on the command line, for messages.
    pub fn shown(&self) -> String {
        self.archive
            .as_ref()
            .unwrap_or(&self.dir)
            .display()
            .to_string()
    }

    /// The directory being written: PATH itself, or an archive's staging directory.
    pub fn staging(&self) -> &Path {
        &self.dir
    }

    fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.dir.join(blob_path(digest))
    }

    /// Whether the layout holds the blob with the expected size. Blobs are only ever
    /// written whole and verified (temporary file, then rename), so one that is there is
    /// good.
    pub fn has_blob(&self, digest: &Digest, size: Option<u64>) -> bool {
        match std::fs::metadata(self.blob_file(digest)) {
            Ok(meta) => meta.is_file() && size.is_none_or(|s| s == meta.len()),
            Err(_) => false,
        }
    }

    /// Writes a blob from a stream already checked against its digest (a
    /// [`VerifiedStream`]): into a temporary file, renamed into place only when the stream
    /// ended without error. Returns the bytes written.
    pub async fn write_blob(
        &self,
        digest: &Digest,
        mut stream: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
        mut on_chunk: impl FnMut(u64),
    ) -> Result<u64, std::io::Error> {
        let path = self.blob_file(digest);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let temp = partial_name(&path);
        let result = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            let mut written = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                file.write_all(&chunk).await?;
                written += chunk.len() as u64;
                on_chunk(chunk.len() as u64);
            }
            file.flush().await?;
            drop(file);
            tokio::fs::rename(&temp, &path).await?;
            Ok(written)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }

    /// Writes a small blob whose digest the caller has checked.
    pub async fn write_blob_bytes(
        &self,
        digest: &Digest,
        bytes: &Bytes,
    ) -> Result<(), std::io::Error> {
        if self.has_blob(digest, Some(bytes.len() as u64)) {
            return Ok(());
        }
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes.clone())]);
        self.write_blob(digest, stream, |_| {}).await.map(|_| ())
    }

    /// Records an image in `index.json` under `name`, replacing an entry of the same name,
    /// and saves the index at once, so that an interruption keeps every finished image.
    pub fn add_image(&self, descriptor: Descriptor, name: &str) -> Result<(), String> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) != Some(name))
            .cloned()
            .collect();
        let mut descriptor = descriptor;
        let mut annotations = descriptor.annotations().clone().unwrap_or_default();
        annotations.insert(REF_NAME.to_string(), name.to_string());
        annotations.insert(CONTAINERD_NAME.to_string(), name.to_string());
        descriptor.set_annotations(Some(annotations));
        manifests.push(descriptor);
        index.set_manifests(manifests);
        let bytes = serde_json::to_vec(&*index)
            .map_err(|e| format!("layout {}: {INDEX_FILE}: {e}", self.shown()))?;
        let path = self.dir.join(INDEX_FILE);
        let temp = partial_name(&path);
        std::fs::write(&temp, bytes)
            .and_then(|()| std::fs::rename(&temp, &path))
            .map_err(|e| format!("layout {}: cannot write {INDEX_FILE}: {e}", self.shown()))
    }

    /// Finishes the layout: drops leftovers of interrupted writes and, for an archive,
    /// writes the tar and removes the staging directory.
    pub fn finish(&self) -> Result<(), String> {
        remove_partials(&self.dir.join("blobs"));
        let Some(archive) = &self.archive else {
            return Ok(());
        };
        let shown = archive.display();
        let temp = partial_name(archive);
        write_tar(&self.dir, &temp).map_err(|e| format!("archive {shown}: {e}"))?;
        std::fs::rename(&temp, archive).map_err(|e| format!("archive {shown}: {e}"))?;
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| format!("archive {shown}: cannot remove {}: {e}", self.dir.display()))
    }
}

fn empty_index() -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_manifests(Vec::new());
    index
}

/// The name an image is recorded under.
pub fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

/// A temporary name beside `path`, unique within this process: two tasks may write the same
/// blob at once (one manifest under two tags).
fn partial_name(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}-{n}.partial", std::process::id()));
    PathBuf::from(name)
}

fn remove_partials(dir: &Path) {
    let Ok(algorithms) = std::fs::read_dir(dir) else {
        return;
    };
    for alg in algorithms.flatten() {
        let Ok(files) = std::fs::read_dir(alg.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// Tars a layout directory: `oci-layout`, `index.json`, then every blob.
fn write_tar(dir: &Path, out: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(out)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_path_with_name(dir.join(OCI_LAYOUT_FILE), OCI_LAYOUT_FILE)?;
    builder.append_path_with_name(dir.join(INDEX_FILE), INDEX_FILE)?;
    let mut algorithms: Vec<_> = std::fs::read_dir(dir.join("blobs"))?
        .filter_map(Result::ok)
        .collect();
    algorithms.sort_by_key(|e| e.file_name());
    for alg in algorithms {
        let alg_name = alg.file_name().to_string_lossy().to_string();
        let mut blobs: Vec<_> = std::fs::read_dir(alg.path())?
            .filter_map(Result::ok)
            .filter(|f| !f.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        blobs.sort_by_key(|e| e.file_name());
        for blob in blobs {
            let name = format!("blobs/{alg_name}/{}", blob.file_name().to_string_lossy());
            builder.append_path_with_name(blob.path(), name)?;
        }
    }
    let mut inner = builder.into_inner()?;
    std::io::Write::flush(&mut inner)?;
    inner.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Unpacks an existing archive into the staging directory, to add images to it.
fn unpack(archive: &Path, staging: &Path) -> Result<(), String> {
    let shown = archive.display();
    let file = std::fs::File::open(archive).map_err(|e| format!("archive {shown}: {e}"))?;
    let temp = partial_name(staging);
    let _ = std::fs::remove_dir_all(&temp);
    // `unpack` refuses entries that would land outside the directory.
    tar::Archive::new(file)
        .unpack(&temp)
        .map_err(|e| format!("archive {shown}: cannot unpack: {e}"))?;
    std::fs::rename(&temp, staging).map_err(|e| format!("archive {shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> Digest {
        crate::oci::verify::sha256_digest(data).parse().unwrap()
    }

    #[tokio::test]
    async fn writes_a_layout_and_reads_it_back_as_dir_and_archive() {
        let tmp = tempfile::tempdir().unwrap();
        for target in ["dir", "bundle.tar"] {
            let path = tmp.path().join(target);
            let writer = LayoutWriter::open(&path).unwrap();
            let blob = Bytes::from_static(b"{\"schemaVersion\":2}");
            let digest = digest_of(&blob);
            writer.write_blob_bytes(&digest, &blob).await.unwrap();
            assert!(writer.has_blob(&digest, Some(blob.len() as u64)));
            assert!(!writer.has_blob(&digest, Some(1)));
            let d = Descriptor::new(
                oci_spec::image::MediaType::ImageManifest,
                blob.len() as u64,
                digest.clone(),
            );
            writer.add_image(d.clone(), "reg.io/a:v1").unwrap();
            writer.add_image(d, "reg.io/a:v1").unwrap();
            writer.finish().unwrap();

            let reader = LayoutReader::open(&path).unwrap();
            assert_eq!(reader.index().manifests().len(), 1, "{target}");
            assert_eq!(
                ref_name(&reader.index().manifests()[0]),
                Some("reg.io/a:v1")
            );
            assert_eq!(reader.read_blob(&digest, 1024).unwrap(), blob);
            assert_eq!(reader.blob_size(&digest), Some(blob.len() as u64));
            let other = digest_of(b"other");
            assert!(
                reader
                    .read_blob(&other, 1024)
                    .unwrap_err()
                    .contains("missing")
            );
        }
        assert!(!tmp.path().join("bundle.tar.partial").exists());
    }

    #[test]
    fn missing_and_corrupt_layouts_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = LayoutReader::open(&tmp.path().join("nope")).err().unwrap();
        assert!(err.contains("nope") && err.contains("not found"), "{err}");
        let err = LayoutReader::open(tmp.path()).err().unwrap();
        assert!(err.contains("index.json missing"), "{err}");
        std::fs::write(tmp.path().join("index.json"), "{").unwrap();
        let err = LayoutReader::open(tmp.path()).err().unwrap();
        assert!(err.contains("index.json is corrupt"), "{err}");
        let junk = tmp.path().join("junk.tar");
        std::fs::write(&junk, b"this is not a tar").unwrap();
        assert!(LayoutReader::open(&junk).is_err());
    }

    #[test]
    fn corrupt_blob_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let digest = digest_of(b"good");
        std::fs::create_dir_all(tmp.path().join("blobs/sha256")).unwrap();
        std::fs::write(tmp.path().join(blob_path(&digest)), b"evil").unwrap();
        std::fs::write(
            tmp.path().join("index.json"),
            r#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .unwrap();
        let reader = LayoutReader::open(tmp.path()).unwrap();
        let err = reader.read_blob(&digest, 100).unwrap_err();
        assert!(err.contains("does not match its digest"), "{err}");
    }
}
