//! Hub ids resolved to snapshot folders in `huggingface_hub`'s cache layout:
//!
//! ```text
//! $HF_HUB_CACHE/models--OWNER--NAME/refs/main                  (the commit sha)
//!                                 /snapshots/<sha>/config.json (-> ../../blobs/<etag>)
//!                                 /blobs/<etag>
//! ```
//!
//! A revision already there (a branch in `refs/`, or a commit sha) is used without a network,
//! so files Python tools downloaded are reused; otherwise the files are downloaded into the same
//! layout, unless `HF_HUB_OFFLINE` is set.

use std::path::{Path, PathBuf};

use crate::client::{HubClient, Request, check_repo_id, encode_segment, hf_home, sha256_file};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    fn plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }

    /// The prefix of the repository in download URLs.
    fn url_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        }
    }
}

/// `HF_HUB_CACHE`, or `$HF_HOME/hub`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// Whether `HF_HUB_OFFLINE` is set to a true value.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// The snapshot folder of `repo` at `revision` (default `main`), from the environment's cache,
/// downloading it from `HF_ENDPOINT` when it is missing and the Hub is not offline.
pub fn resolve(kind: RepoType, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let client = (!offline()).then(HubClient::from_env);
    resolve_in(&cache_dir(), client.as_ref(), kind, repo, revision)
}

/// [`resolve`] with an explicit cache folder and client (`None`: offline).
pub fn resolve_in(
    cache: &Path,
    client: Option<&HubClient>,
    kind: RepoType,
    repo: &str,
    revision: Option<&str>,
) -> Result<PathBuf> {
    let (owner, name) = check_repo_id(repo)?;
    let revision = revision.unwrap_or("main");
    let root = cache.join(format!("{}--{owner}--{name}", kind.plural()));
    if let Some(snapshot) = cached(&root, revision) {
        return Ok(snapshot);
    }
    let Some(client) = client else {
        return Err(Error::Offline {
            repo: repo.to_string(),
            revision: revision.to_string(),
            cache: cache.to_path_buf(),
        });
    };
    download(client, &root, kind, repo, revision)
}

/// The repository a snapshot folder of the cache belongs to
/// (`.../datasets--OWNER--NAME/snapshots/<sha>` -> dataset `OWNER/NAME`): what [`resolve`]
/// returned, read back.
pub fn repo_of_snapshot(path: &Path) -> Option<(RepoType, String)> {
    let repo = path.parent().filter(|p| p.ends_with("snapshots"))?.parent()?;
    let name = repo.file_name()?.to_str()?;
    let (kind, rest) = [RepoType::Model, RepoType::Dataset]
        .into_iter()
        .find_map(|k| Some((k, name.strip_prefix(k.plural())?.strip_prefix("--")?)))?;
    let (owner, repo) = rest.split_once("--")?;
    Some((kind, format!("{owner}/{repo}")))
}

fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot of `revision` when the cache holds it.
fn cached(root: &Path, revision: &str) -> Option<PathBuf> {
    let sha = if is_commit_sha(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(root.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = root.join("snapshots").join(sha);
    snapshot.is_dir().then_some(snapshot)
}

/// Weight formats left out of a model download when safetensors are there (transformers and
/// Temper read safetensors).
const OTHER_WEIGHTS: [&str; 9] = [
    ".bin", ".pth", ".pt", ".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".gguf",
];

fn download(client: &HubClient, root: &Path, kind: RepoType, repo: &str, revision: &str) -> Result<PathBuf> {
    let endpoint = client.endpoint();
    let url = format!(
        "{endpoint}/api/{}/{repo}/revision/{}",
        kind.plural(),
        encode_segment(revision)
    );
    let info = client.expect_ok(Request {
        method: "GET",
        url: &url,
        headers: Vec::new(),
        body: None,
    })?;
    let info = info.json(&url)?;
    let sha = info["sha"]
        .as_str()
        .filter(|s| is_commit_sha(s))
        .ok_or_else(|| Error::Protocol {
            url: url.clone(),
            message: "no commit sha".into(),
        })?;
    let mut files: Vec<String> = info["siblings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["rfilename"].as_str().map(String::from))
        .collect();
    if kind == RepoType::Model && files.iter().any(|f| f.ends_with(".safetensors")) {
        files.retain(|f| !OTHER_WEIGHTS.iter().any(|ext| f.ends_with(ext)) && !f.starts_with("onnx/"));
    }
    let snapshot = root.join("snapshots").join(sha);
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    for file in &files {
        let parts: Vec<&str> = file.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Err(Error::Protocol {
                url: url.clone(),
                message: format!("refusing the file name {file:?}"),
            });
        }
        let link = snapshot.join(file);
        if link.exists() {
            continue;
        }
        let encoded: Vec<String> = parts.iter().map(|p| encode_segment(p)).collect();
        let file_url = format!(
            "{endpoint}/{}{repo}/resolve/{sha}/{}",
            kind.url_prefix(),
            encoded.join("/")
        );
        let tmp = blobs.join(format!(".{}.incomplete", std::process::id()));
        let tag = client.download(&file_url, &tmp)?;
        let blob_name = match tag {
            Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => t,
            _ => sha256_file(&tmp)?,
        };
        let blob = blobs.join(&blob_name);
        std::fs::rename(&tmp, &blob).map_err(|e| Error::io(&blob, e))?;
        let parent = link.parent().expect("a file has a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        // Relative, as huggingface_hub links them: ../../blobs/<etag> from snapshots/<sha>/.
        let mut target = PathBuf::new();
        for _ in 0..parts.len() + 1 {
            target.push("..");
        }
        target.push("blobs");
        target.push(&blob_name);
        std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::io(&link, e))?;
    }
    std::fs::create_dir_all(&snapshot).map_err(|e| Error::io(&snapshot, e))?;
    if !is_commit_sha(revision) {
        let refs = root.join("refs").join(revision);
        let parent = refs.parent().expect("refs/<name> has a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        std::fs::write(&refs, sha).map_err(|e| Error::io(&refs, e))?;
    }
    Ok(snapshot)
}
