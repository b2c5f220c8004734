//! Publisher-built manifests (`fog manifest`): the manifests of files where the content is packaged, made
//! with the tracker's own chunking ([`ManifestBuilder`]), so the tracker can serve an object without
//! downloading it. Files are streamed, never loaded whole; a directory is walked recursively and each file
//! is mapped to the URL its origin serves it at.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use fog_proto::manifest::{
    Manifest, ManifestBuilder, MAX_CHUNK_SIZE, MAX_MANIFEST_JSON, MIN_CHUNK_SIZE, SIDECAR_SUFFIX,
};
use reqwest::Url;

/// Bytes read from a file at a time: large reads keep the disk streaming, and bound the memory per file.
const READ_BUFFER: usize = 1 << 20;
/// Deepest directory nesting below the walked root (HLS and DASH trees are a few levels deep).
const MAX_DEPTH: usize = 32;
/// Most directory entries one walk looks at, so a mistaken PATH (say `/`) or a maze of symbolic links fails
/// instead of filling memory.
const MAX_ENTRIES: usize = 1_000_000;

/// Why a manifest could not be built or written. All of these are about the local files or the arguments:
/// trying again does not help until they change.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes")]
    ChunkSize(u64),
    #[error("--base-url {base:?}: {message}")]
    BaseUrl { base: String, message: String },
    #[error("{path}: its URL {url:?} is not one the tracker serves: {message}")]
    Url { path: PathBuf, url: String, message: String },
    #[error("{0}: the name is not UTF-8, so it has no URL")]
    NotUtf8(PathBuf),
    #[error("{0} is a manifest sidecar, not an object")]
    IsSidecar(PathBuf),
    #[error("{0} is neither a file nor a directory")]
    NotAFile(PathBuf),
    #[error("{0} is nested more than {MAX_DEPTH} directories deep")]
    TooDeep(PathBuf),
    #[error("more than {MAX_ENTRIES} files and directories below {0}")]
    TooMany(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the manifest of {path} is {bytes} bytes of JSON, over the {MAX_MANIFEST_JSON} a tracker accepts; use a larger --chunk-size or --group-size")]
    TooLarge { path: PathBuf, bytes: usize },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// A blocking file task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(#[source] tokio::task::JoinError),
}

/// A file to describe, and the URL its origin serves it at (canonical, as the tracker keys it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub path: PathBuf,
    pub url: String,
}

/// An entry of a walked directory that is not described, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("a symbolic link leading out of the directory")]
    LeavesRoot,
    #[error("a symbolic link to nothing")]
    Dangling,
    #[error("a symbolic link to a directory that contains it")]
    Loop,
    #[error("neither a file nor a directory")]
    Special,
}

/// What `fog manifest PATH` covers: the objects, the entries left out, and the files that have no URL.
/// Sidecar files are left out silently: they are manifests, not objects.
#[derive(Debug, Default)]
pub struct Plan {
    pub objects: Vec<Object>,
    pub skipped: Vec<Skipped>,
    pub failed: Vec<PublishError>,
}

/// A chunk size from the command line, checked against the bounds every tracker enforces.
pub fn chunk_size(bytes: u64) -> Result<u32, PublishError> {
    u32::try_from(bytes)
        .ok()
        .filter(|c| (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(c))
        .ok_or(PublishError::ChunkSize(bytes))
}

/// The objects under `path`. For a file, `base_url` is the object's URL, or (ending in `/`) the URL the
/// file's name is appended to; for a directory, it is the directory's URL and each file's path below it is
/// appended, one percent-encoded segment per component.
pub async fn plan(path: &Path, base_url: &str) -> Result<Plan, PublishError> {
    let (path, base_url) = (path.to_path_buf(), base_url.to_string());
    tokio::task::spawn_blocking(move || plan_blocking(&path, &base_url)).await.map_err(PublishError::Internal)?
}

fn plan_blocking(path: &Path, base_url: &str) -> Result<Plan, PublishError> {
    let read_err = |source| PublishError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.is_file() {
        if is_sidecar(path) {
            return Err(PublishError::IsSidecar(path.to_path_buf()));
        }
        let url = if base_url.ends_with('/') {
            let name = path.file_name().map(PathBuf::from).ok_or_else(|| PublishError::NotAFile(path.to_path_buf()))?;
            object_url(&directory_url(base_url)?, path, &name)?
        } else {
            canonical(path, base_url)?
        };
        return Ok(Plan { objects: vec![Object { path: path.to_path_buf(), url }], ..Plan::default() });
    }
    if !meta.is_dir() {
        return Err(PublishError::NotAFile(path.to_path_buf()));
    }
    let base = directory_url(base_url)?;
    let root = std::fs::canonicalize(path).map_err(read_err)?;
    let mut walk = Walk { base, root: root.clone(), ancestors: vec![root], entries: 0, plan: Plan::default() };
    walk.dir(path, Path::new(""))?;
    Ok(walk.plan)
}

struct Walk {
    base: Url,
    /// The walked directory with symbolic links resolved: links may lead anywhere below it.
    root: PathBuf,
    /// The directories from the root down to the one being walked, resolved: a link to one of them is a
    /// loop. (A directory reached by two paths is walked twice: the origin serves it at both.)
    ancestors: Vec<PathBuf>,
    /// Entries looked at so far, at most [`MAX_ENTRIES`].
    entries: usize,
    plan: Plan,
}

impl Walk {
    /// Walks `dir`, `relative` to the root, in name order; the last of `ancestors` is `dir` resolved.
    fn dir(&mut self, dir: &Path, relative: &Path) -> Result<(), PublishError> {
        // The root is the first ancestor, at depth 0.
        if self.ancestors.len() > MAX_DEPTH + 1 {
            return Err(PublishError::TooDeep(dir.to_path_buf()));
        }
        let read_err = |source| PublishError::Read { path: dir.to_path_buf(), source };
        let room = MAX_ENTRIES - self.entries;
        let mut entries = std::fs::read_dir(dir)
            .map_err(read_err)?
            .take(room + 1)
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        if entries.len() > room {
            return Err(PublishError::TooMany(self.root.clone()));
        }
        self.entries += entries.len();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let (path, name) = (entry.path(), entry.file_name());
            let relative = relative.join(&name);
            let kind = entry.file_type().map_err(|source| PublishError::Read { path: path.clone(), source })?;
            let (meta, real) = if kind.is_symlink() {
                let Ok(target) = std::fs::canonicalize(&path) else {
                    self.skip(path, SkipReason::Dangling);
                    continue;
                };
                if !target.starts_with(&self.root) {
                    self.skip(path, SkipReason::LeavesRoot);
                    continue;
                }
                let meta =
                    std::fs::metadata(&target).map_err(|source| PublishError::Read { path: path.clone(), source })?;
                (meta, target)
            } else {
                let meta = entry.metadata().map_err(|source| PublishError::Read { path: path.clone(), source })?;
                (meta, self.ancestors.last().expect("the root at least").join(&name))
            };
            if meta.is_dir() {
                if self.ancestors.contains(&real) {
                    self.skip(path, SkipReason::Loop);
                } else if name.to_str().is_none() {
                    self.plan.failed.push(PublishError::NotUtf8(path));
                } else {
                    self.ancestors.push(real);
                    let walked = self.dir(&path, &relative);
                    self.ancestors.pop();
                    walked?;
                }
            } else if !meta.is_file() {
                self.skip(path, SkipReason::Special);
            } else if !is_sidecar(&path) {
                match object_url(&self.base, &path, &relative) {
                    Ok(url) => self.plan.objects.push(Object { path, url }),
                    Err(e) => self.plan.failed.push(e),
                }
            }
        }
        Ok(())
    }

    fn skip(&mut self, path: PathBuf, reason: SkipReason) {
        self.plan.skipped.push(Skipped { path, reason });
    }
}

fn is_sidecar(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(SIDECAR_SUFFIX))
}

/// `base` as a URL that relative paths are appended to.
fn directory_url(base: &str) -> Result<Url, PublishError> {
    let invalid = |message: String| PublishError::BaseUrl { base: base.to_string(), message };
    let url =
        Url::parse(&fog_proto::origins::canonical_url(base).map_err(invalid)?).map_err(|e| invalid(e.to_string()))?;
    if url.query().is_some() {
        return Err(invalid("a URL that file paths are appended to cannot have a query".into()));
    }
    Ok(url)
}

/// The URL of the file at `path`, `relative` to the directory served at `base`: each component of
/// `relative` becomes one path segment, percent-encoded (so a `?`, `#` or `%` in a name stays part of it).
pub fn object_url(base: &Url, path: &Path, relative: &Path) -> Result<String, PublishError> {
    let mut url = base.clone();
    {
        let Ok(mut segments) = url.path_segments_mut() else {
            return Err(PublishError::BaseUrl { base: base.to_string(), message: "it cannot have a path".into() });
        };
        segments.pop_if_empty();
        for component in relative.components() {
            let Component::Normal(name) = component else {
                return Err(PublishError::NotAFile(path.to_path_buf()));
            };
            segments.push(name.to_str().ok_or_else(|| PublishError::NotUtf8(path.to_path_buf()))?);
        }
    }
    canonical(path, url.as_str())
}

fn canonical(path: &Path, url: &str) -> Result<String, PublishError> {
    fog_proto::origins::canonical_url(url).map_err(|message| PublishError::Url {
        path: path.to_path_buf(),
        url: url.to_string(),
        message,
    })
}

/// The media type players expect for a file, by its extension; `None` for others (the tracker then has no
/// content type to pass on, and the origin's own is used on fallback).
pub fn guess_content_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "m3u8" => "application/vnd.apple.mpegurl",
        "ts" => "video/mp2t",
        "mp4" | "m4s" | "m4v" => "video/mp4",
        "m4a" => "audio/mp4",
        "mpd" => "application/dash+xml",
        "webm" => "video/webm",
        "vtt" => "text/vtt",
        "aac" => "audio/aac",
        "mp3" => "audio/mpeg",
        "json" => "application/json",
        _ => return None,
    })
}

/// The manifest of the file at `path`, served at `url`, read in pieces on a blocking thread. It has no etag:
/// the publisher cannot know the one its origin will send.
/// With `group_size`, the manifest carries group hashes (see `fog_proto::groups`).
pub async fn build(
    path: &Path,
    url: String,
    chunk_size: u32,
    group_size: Option<u32>,
) -> Result<Manifest, PublishError> {
    let path = path.to_path_buf();
    let build = move || build_blocking(&path, url, chunk_size, group_size);
    tokio::task::spawn_blocking(build).await.map_err(PublishError::Internal)?
}

fn build_blocking(
    path: &Path,
    url: String,
    chunk_size: u32,
    group_size: Option<u32>,
) -> Result<Manifest, PublishError> {
    let read_err = |source| PublishError::Read { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut builder = ManifestBuilder::with_groups(chunk_size, group_size);
    let mut buf = vec![0; READ_BUFFER];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => builder.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    let manifest = builder.finish(url, guess_content_type(path).map(str::to_string), None);
    // Checked here rather than refused by the tracker (or ignored as a sidecar) after the upload.
    let bytes = serde_json::to_vec(&manifest).map_or(usize::MAX, |json| json.len());
    if bytes > MAX_MANIFEST_JSON {
        return Err(PublishError::TooLarge { path: path.to_path_buf(), bytes });
    }
    Ok(manifest)
}

/// Where the sidecar of the object file at `path` goes: next to it, `<file>` + [`SIDECAR_SUFFIX`].
pub fn sidecar_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(SIDECAR_SUFFIX);
    PathBuf::from(name)
}

/// Writes `manifest` as the sidecar of the file at `path`, atomically (a `.part` file renamed), so an
/// origin serving the directory never serves half a manifest. Returns the sidecar's path.
pub async fn write_sidecar(path: &Path, manifest: &Manifest) -> Result<PathBuf, PublishError> {
    let sidecar = sidecar_path(path);
    let mut part = sidecar.clone().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut json =
        serde_json::to_vec(manifest).map_err(|e| PublishError::Write { path: sidecar.clone(), source: e.into() })?;
    json.push(b'\n');
    let written = match tokio::fs::write(&part, &json).await {
        Ok(()) => tokio::fs::rename(&part, &sidecar).await,
        Err(e) => Err(e),
    };
    if let Err(source) = written {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(PublishError::Write { path: sidecar, source });
    }
    Ok(sidecar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_proto::ChunkHash;

    fn object(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_file_gets_the_manifest_the_tracker_would_compute() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Longer than two reads and not a whole number of chunks, so reads and chunks cut differently.
        let bytes = object(2 * READ_BUFFER + 12_345);
        let path = dir.path().join("seg.ts");
        std::fs::write(&path, &bytes).expect("write");
        let url = "http://o.example/vod/seg.ts".to_string();
        let built = build(&path, url.clone(), MIN_CHUNK_SIZE, Some(4096)).await.expect("built");

        let mut whole = ManifestBuilder::with_groups(MIN_CHUNK_SIZE, Some(4096));
        whole.update(&bytes);
        let expected = whole.finish(url, Some("video/mp2t".into()), None);
        assert_eq!(built, expected);
        assert_eq!(built.content_id(), expected.content_id());
        let hashes: Vec<ChunkHash> = bytes.chunks(MIN_CHUNK_SIZE as usize).map(ChunkHash::of).collect();
        assert_eq!(built.chunks, hashes);
        built.validate().expect("consistent");

        let empty = dir.path().join("empty.bin");
        std::fs::write(&empty, b"").expect("write");
        let m = build(&empty, "http://o.example/e".into(), MIN_CHUNK_SIZE, None).await.expect("built");
        assert_eq!((m.size, m.chunks.len(), m.content_type), (0, 0, None));
    }

    #[test]
    fn nested_names_become_percent_encoded_segments() {
        let base = directory_url("http://o.example/vod/").expect("base");
        let cases = [
            ("a.ts", "http://o.example/vod/a.ts"),
            ("season 1/épisode 2.ts", "http://o.example/vod/season%201/%C3%A9pisode%202.ts"),
            ("日本/本?#.m3u8", "http://o.example/vod/%E6%97%A5%E6%9C%AC/%E6%9C%AC%3F%23.m3u8"),
            ("100%.mp4", "http://o.example/vod/100%25.mp4"),
        ];
        for (relative, url) in cases {
            assert_eq!(object_url(&base, Path::new(relative), Path::new(relative)).expect(relative), url);
        }
        // A directory's URL gets its slash whether written with one or not; a bare host is its root.
        let no_slash = directory_url("http://o.example/vod").expect("base");
        assert_eq!(object_url(&no_slash, Path::new("x"), Path::new("a b")).expect("url"), "http://o.example/vod/a%20b");
        let host = directory_url("https://o.example").expect("base");
        assert_eq!(object_url(&host, Path::new("x"), Path::new("d/a")).expect("url"), "https://o.example/d/a");
        // An encoded backslash is a path separator to some origins: the tracker refuses such URLs.
        assert!(matches!(object_url(&base, Path::new("x"), Path::new("a\\b")), Err(PublishError::Url { .. })));
        assert!(matches!(directory_url("ftp://o.example/"), Err(PublishError::BaseUrl { .. })));
        assert!(matches!(directory_url("http://o.example/?v=1"), Err(PublishError::BaseUrl { .. })));
    }

    #[tokio::test]
    async fn a_file_is_its_url_or_appended_to_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("movie 1.mp4");
        std::fs::write(&path, b"x").expect("write");
        let plan = plan(&path, "https://o.example/v/123").await.expect("plan");
        assert_eq!(plan.objects, [Object { path: path.clone(), url: "https://o.example/v/123".into() }]);
        let plan = super::plan(&path, "https://o.example/v/").await.expect("plan");
        assert_eq!(plan.objects[0].url, "https://o.example/v/movie%201.mp4");
        let sidecar = sidecar_path(&path);
        std::fs::write(&sidecar, b"{}").expect("write");
        assert!(matches!(super::plan(&sidecar, "https://o.example/v/").await, Err(PublishError::IsSidecar(_))));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_walk_lists_objects_in_order_and_leaves_out_sidecars_and_escaping_links() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"s").expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("hls/720p")).expect("mkdir");
        for file in ["hls/720p/seg 1.ts", "hls/master.m3u8", "a.mp4"] {
            std::fs::write(root.join(file), b"x").expect("write");
        }
        std::fs::write(sidecar_path(&root.join("a.mp4")), b"{}").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("leak")).expect("link");
        std::os::unix::fs::symlink(outside.path(), root.join("leakdir")).expect("link");
        std::os::unix::fs::symlink(root.join("a.mp4"), root.join("b.mp4")).expect("link");
        std::os::unix::fs::symlink(root, root.join("hls/loop")).expect("link");
        std::os::unix::fs::symlink(root.join("hls/720p"), root.join("hls/best")).expect("link");
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).expect("link");

        let plan = plan(root, "http://o.example/vod/").await.expect("plan");
        let urls: Vec<&str> = plan.objects.iter().map(|o| o.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://o.example/vod/a.mp4",
                "http://o.example/vod/b.mp4",
                "http://o.example/vod/hls/720p/seg%201.ts",
                "http://o.example/vod/hls/best/seg%201.ts",
                "http://o.example/vod/hls/master.m3u8",
            ]
        );
        assert_eq!(plan.objects[2].path, root.join("hls/720p/seg 1.ts"));
        let skipped: Vec<(PathBuf, SkipReason)> = plan.skipped.into_iter().map(|s| (s.path, s.reason)).collect();
        assert_eq!(
            skipped,
            [
                (root.join("dangling"), SkipReason::Dangling),
                (root.join("hls/loop"), SkipReason::Loop),
                (root.join("leak"), SkipReason::LeavesRoot),
                (root.join("leakdir"), SkipReason::LeavesRoot),
            ]
        );
        assert!(plan.failed.is_empty());
    }

    #[tokio::test]
    async fn a_sidecar_is_written_whole_next_to_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.m4s");
        std::fs::write(&path, object(100_000)).expect("write");
        let manifest = build(&path, "http://o.example/a.m4s".into(), MIN_CHUNK_SIZE, None).await.expect("built");
        let sidecar = write_sidecar(&path, &manifest).await.expect("written");
        assert_eq!(sidecar, dir.path().join("a.m4s.fog-manifest.json"));
        let read: Manifest = serde_json::from_slice(&std::fs::read(&sidecar).expect("read")).expect("json");
        assert_eq!(read, manifest);
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 2, "no .part left behind: {names:?}");
    }

    #[test]
    fn content_types_players_expect() {
        let cases = [
            ("index.m3u8", Some("application/vnd.apple.mpegurl")),
            ("SEG.TS", Some("video/mp2t")),
            ("init.mp4", Some("video/mp4")),
            ("chunk.m4s", Some("video/mp4")),
            ("clip.m4v", Some("video/mp4")),
            ("audio.m4a", Some("audio/mp4")),
            ("manifest.mpd", Some("application/dash+xml")),
            ("v.webm", Some("video/webm")),
            ("subs.vtt", Some("text/vtt")),
            ("a.aac", Some("audio/aac")),
            ("a.mp3", Some("audio/mpeg")),
            ("meta.json", Some("application/json")),
            ("archive.tar", None),
            ("README", None),
        ];
        for (name, ty) in cases {
            assert_eq!(guess_content_type(Path::new(name)), ty, "{name}");
        }
    }

    #[test]
    fn chunk_sizes_within_bounds() {
        assert_eq!(chunk_size(1 << 20).expect("1MiB"), 1 << 20);
        assert_eq!(chunk_size(u64::from(MIN_CHUNK_SIZE)).expect("min"), MIN_CHUNK_SIZE);
        assert_eq!(chunk_size(u64::from(MAX_CHUNK_SIZE)).expect("max"), MAX_CHUNK_SIZE);
        for bad in [0, u64::from(MIN_CHUNK_SIZE) - 1, u64::from(MAX_CHUNK_SIZE) + 1, 1 << 40] {
            assert!(matches!(chunk_size(bad), Err(PublishError::ChunkSize(b)) if b == bad));
        }
    }
}
