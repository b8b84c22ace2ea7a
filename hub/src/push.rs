//! Pushing a folder to a Hub repository as `huggingface_hub.upload_folder` does: create the
//! repository if missing, ask `preupload` which files go to LFS, upload LFS objects (basic or
//! multipart, skipping those the server has), then one NDJSON commit. The commit is the last
//! request: a push that fails earlier leaves nothing committed.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::client::{HubClient, Request, check_repo_id, encode_segment, sha256_file};
use crate::error::{Error, Result};

const LFS_HEADERS: [(&str, &str); 2] = [
    ("accept", "application/vnd.git-lfs+json"),
    ("content-type", "application/vnd.git-lfs+json"),
];
/// Files per preupload and LFS batch request (huggingface_hub's batch size).
const BATCH: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `OWNER/NAME`.
    pub repo: String,
    /// Create the repository private (when it does not exist yet).
    pub private: bool,
    /// The branch to commit to (default `main`).
    pub revision: Option<String>,
    /// Open a pull request instead of committing to the branch.
    pub create_pr: bool,
    /// The commit's summary line.
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PushReport {
    pub files: usize,
    pub lfs_uploaded: usize,
    /// LFS objects the server already had.
    pub lfs_skipped: usize,
    pub bytes_uploaded: u64,
    pub commit_url: String,
    pub pull_request_url: Option<String>,
}

/// A file to push.
struct Local {
    /// Relative, `/`-separated.
    path: String,
    abs: PathBuf,
    size: u64,
}

/// Pushes every file of `dir` except hidden files and folders, temporary files and
/// `checkpoint-*` folders (as the transformers Trainer's push leaves checkpoints out).
pub fn push_folder(client: &HubClient, dir: &Path, opts: &PushOptions) -> Result<PushReport> {
    client.require_token()?;
    let (owner, name) = check_repo_id(&opts.repo)?;
    let files = list_files(dir)?;
    if files.is_empty() {
        return Err(Error::Path {
            path: dir.to_path_buf(),
            message: "no files to push".into(),
        });
    }
    let endpoint = client.endpoint();
    let revision = encode_segment(opts.revision.as_deref().unwrap_or("main"));

    // 1. The repository (409: it exists already).
    let url = format!("{endpoint}/api/repos/create");
    let body = json!({"name": name, "organization": owner, "private": opts.private, "type": "model"});
    let reply = client.send(Request {
        method: "POST",
        url: &url,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Some(body.to_string().as_bytes()),
    })?;
    if !(200..300).contains(&reply.status) && reply.status != 409 {
        return Err(Error::Http {
            method: "POST",
            url,
            status: reply.status,
            message: String::from_utf8_lossy(&reply.body).into_owned(),
        });
    }

    // 2. Which files are LFS.
    let mut lfs = vec![false; files.len()];
    let mut ignored = vec![false; files.len()];
    let url = format!("{endpoint}/api/models/{}/preupload/{revision}", opts.repo);
    for (chunk_index, chunk) in files.chunks(BATCH).enumerate() {
        let mut entries = Vec::new();
        for f in chunk {
            let mut sample = vec![0u8; 512.min(f.size as usize)];
            std::fs::File::open(&f.abs)
                .and_then(|mut h| h.read_exact(&mut sample))
                .map_err(|e| Error::io(&f.abs, e))?;
            entries.push(json!({"path": f.path, "size": f.size, "sample": BASE64.encode(&sample)}));
        }
        let body = json!({"files": entries}).to_string();
        let reply = client.expect_ok(Request {
            method: "POST",
            url: &url,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.as_bytes()),
        })?;
        let answer = reply.json(&url)?;
        for item in answer["files"].as_array().into_iter().flatten() {
            let Some(i) = chunk
                .iter()
                .position(|f| Some(f.path.as_str()) == item["path"].as_str())
            else {
                continue;
            };
            let i = chunk_index * BATCH + i;
            lfs[i] = item["uploadMode"].as_str() == Some("lfs");
            ignored[i] = item["shouldIgnore"].as_bool() == Some(true);
        }
    }

    // 3. LFS objects.
    let mut report = PushReport::default();
    let mut oids = vec![String::new(); files.len()];
    let lfs_files: Vec<usize> = (0..files.len()).filter(|&i| lfs[i] && !ignored[i]).collect();
    let url = format!("{endpoint}/{}.git/info/lfs/objects/batch", opts.repo);
    for chunk in lfs_files.chunks(BATCH) {
        let mut objects = Vec::new();
        for &i in chunk {
            oids[i] = sha256_file(&files[i].abs)?;
            objects.push(json!({"oid": oids[i], "size": files[i].size}));
        }
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects,
            "hash_algo": "sha256",
            "ref": {"name": opts.revision.as_deref().unwrap_or("main")},
        })
        .to_string();
        let reply = client.expect_ok(Request {
            method: "POST",
            url: &url,
            headers: lfs_headers(),
            body: Some(body.as_bytes()),
        })?;
        let answer = reply.json(&url)?;
        for object in answer["objects"].as_array().into_iter().flatten() {
            let oid = object["oid"].as_str().unwrap_or_default();
            let Some(&i) = chunk.iter().find(|&&i| oids[i] == oid) else {
                continue;
            };
            if let Some(err) = object.get("error") {
                return Err(Error::Protocol {
                    url: url.clone(),
                    message: format!("LFS object for {}: {err}", files[i].path),
                });
            }
            match object.get("actions") {
                None => report.lfs_skipped += 1,
                Some(actions) => {
                    upload_object(client, &files[i], oid, actions)?;
                    report.lfs_uploaded += 1;
                    report.bytes_uploaded += files[i].size;
                }
            }
        }
    }

    // 4. One commit with every file: regular ones inline, LFS ones by their oid.
    let summary = opts
        .message
        .clone()
        .unwrap_or_else(|| "Upload folder with temper".into());
    let mut ndjson = json!({"key": "header", "value": {"summary": summary, "description": ""}}).to_string();
    for (i, f) in files.iter().enumerate() {
        if ignored[i] {
            continue;
        }
        let line = if lfs[i] {
            json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": oids[i], "size": f.size}})
        } else {
            let bytes = std::fs::read(&f.abs).map_err(|e| Error::io(&f.abs, e))?;
            report.bytes_uploaded += f.size;
            json!({"key": "file", "value": {"content": BASE64.encode(&bytes), "path": f.path, "encoding": "base64"}})
        };
        ndjson.push('\n');
        ndjson.push_str(&line.to_string());
        report.files += 1;
    }
    let mut url = format!("{endpoint}/api/models/{}/commit/{revision}", opts.repo);
    if opts.create_pr {
        url.push_str("?create_pr=1");
    }
    let reply = client.expect_ok(Request {
        method: "POST",
        url: &url,
        headers: vec![("content-type".into(), "application/x-ndjson".into())],
        body: Some(ndjson.as_bytes()),
    })?;
    let answer = reply.json(&url)?;
    report.commit_url = answer["commitUrl"].as_str().unwrap_or_default().to_string();
    report.pull_request_url = answer["pullRequestUrl"].as_str().map(String::from);
    Ok(report)
}

fn lfs_headers() -> Vec<(String, String)> {
    LFS_HEADERS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The headers an LFS action asks for (its `header` map, strings only).
fn action_headers(action: &Value) -> Vec<(String, String)> {
    action["header"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
        .collect()
}

/// Uploads one object as its `upload` action says (one PUT, or one PUT per part then a
/// completion request), then calls `verify` when the server asks for it.
fn upload_object(client: &HubClient, file: &Local, oid: &str, actions: &Value) -> Result<()> {
    let upload = &actions["upload"];
    let href = upload["href"].as_str().ok_or_else(|| Error::Protocol {
        url: client.endpoint().to_string(),
        message: format!("LFS upload action for {} has no href", file.path),
    })?;
    let header = upload["header"].as_object();
    let chunk_size = header
        .and_then(|h| h.get("chunk_size"))
        .and_then(|v| v.as_str().and_then(|s| s.parse::<u64>().ok()).or(v.as_u64()));
    match chunk_size {
        None => {
            let bytes = std::fs::read(&file.abs).map_err(|e| Error::io(&file.abs, e))?;
            client.expect_ok(Request {
                method: "PUT",
                url: href,
                headers: action_headers(upload),
                body: Some(&bytes),
            })?;
        }
        Some(chunk) => {
            let mut parts: Vec<(u64, String)> = header
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?.to_string())))
                .collect();
            parts.sort();
            let mut f = std::fs::File::open(&file.abs).map_err(|e| Error::io(&file.abs, e))?;
            let mut etags = Vec::new();
            for (index, (number, url)) in parts.iter().enumerate() {
                let start = index as u64 * chunk;
                let len = chunk.min(file.size.saturating_sub(start));
                let mut bytes = vec![0u8; len as usize];
                f.seek(SeekFrom::Start(start))
                    .and_then(|_| f.read_exact(&mut bytes))
                    .map_err(|e| Error::io(&file.abs, e))?;
                let reply = client.expect_ok(Request {
                    method: "PUT",
                    url,
                    headers: Vec::new(),
                    body: Some(&bytes),
                })?;
                let etag = reply.etag.ok_or_else(|| Error::Protocol {
                    url: url.clone(),
                    message: format!("part {number} of {}: no ETag in the answer", file.path),
                })?;
                etags.push(json!({"partNumber": number, "etag": etag}));
            }
            let body = json!({"oid": oid, "parts": etags}).to_string();
            client.expect_ok(Request {
                method: "POST",
                url: href,
                headers: lfs_headers(),
                body: Some(body.as_bytes()),
            })?;
        }
    }
    if let Some(href) = actions["verify"]["href"].as_str() {
        let mut headers = lfs_headers();
        headers.extend(action_headers(&actions["verify"]));
        let body = json!({"oid": oid, "size": file.size}).to_string();
        client.expect_ok(Request {
            method: "POST",
            url: href,
            headers,
            body: Some(body.as_bytes()),
        })?;
    }
    Ok(())
}

/// The files to push, sorted. Symbolic links are followed only when they stay inside `dir`; one
/// that points outside is an error, so a push never sends files from elsewhere.
fn list_files(dir: &Path) -> Result<Vec<Local>> {
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let at_top = d == root;
            if name.starts_with('.') || name.ends_with(".tmp") || (at_top && name.starts_with("checkpoint-")) {
                continue;
            }
            let real = path.canonicalize().map_err(|e| Error::io(&path, e))?;
            if !real.starts_with(&root) {
                return Err(Error::Path {
                    path,
                    message: format!("links outside the folder being pushed (to {})", real.display()),
                });
            }
            let meta = std::fs::metadata(&real).map_err(|e| Error::io(&real, e))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(&root).expect("under the root");
                if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                    return Err(Error::Path {
                        path: path.clone(),
                        message: "not a plain relative path".into(),
                    });
                }
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(Local {
                    path: rel.join("/"),
                    abs: real,
                    size: meta.len(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}
