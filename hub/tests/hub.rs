//! The Hub client against a local stand-in for the Hub started by the tests: it implements the
//! endpoints a push and a download use (repo create, preupload, LFS batch with basic and
//! multipart transfers on a second "storage" host, verify, NDJSON commit, revision info,
//! resolve) and checks each request as the Hub would. Plus the cache that Python wrote.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use temper_hub::cache::resolve_in;
use temper_hub::{Error, HubClient, PushOptions, RepoType, push_folder};

const TOKEN: &str = "hf_test_token_abc123";
const UPLOAD_SECRET: &str = "signed-url-secret";
const SHA: &str = "89abcdef0123456789abcdef0123456789abcdef";

#[derive(Default)]
struct Repo {
    private: bool,
    files: BTreeMap<String, Vec<u8>>,
    commits: usize,
}

/// What the stand-in Hub holds and what it saw.
#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    /// LFS objects by (repo, oid): each repository has its own store, as on the Hub.
    lfs: HashMap<(String, String), Vec<u8>>,
    /// Uploaded (PUT / multipart completed) but not yet verified.
    pending: HashMap<String, Vec<u8>>,
    parts: HashMap<(String, u64), Vec<u8>>,
    /// `"METHOD path"` of every request, in order.
    log: Vec<String>,
    /// Requests the real Hub would reject, or a token sent where it must not go.
    violations: Vec<String>,
    // Faults to inject.
    preupload_500s: u32,
    dropped_puts: u32,
    forbid_create: bool,
    /// Answer every API request with a 401 whose body echoes the request's headers back.
    echo_headers: bool,
}

struct MockHub {
    api: String,
    storage: String,
    state: Arc<Mutex<State>>,
}

struct Http {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_request(stream: &mut TcpStream) -> Option<Http> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if let Some(n) = headers.get("content-length").and_then(|n| n.parse::<usize>().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body).ok()?;
    } else if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Http {
        method,
        path,
        headers,
        body,
    })
}

fn respond(stream: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn json_reply(stream: &mut TcpStream, status: u16, v: Value) {
    respond(
        stream,
        status,
        &[("Content-Type", "application/json".into())],
        v.to_string().as_bytes(),
    );
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl MockHub {
    fn start() -> MockHub {
        let state = Arc::new(Mutex::new(State::default()));
        let api = TcpListener::bind("127.0.0.1:0").unwrap();
        let storage = TcpListener::bind("127.0.0.1:0").unwrap();
        let hub = MockHub {
            api: format!("http://{}", api.local_addr().unwrap()),
            storage: format!("http://{}", storage.local_addr().unwrap()),
            state: state.clone(),
        };
        for (listener, is_api) in [(api, true), (storage, false)] {
            let (state, api_url, storage_url) = (state.clone(), hub.api.clone(), hub.storage.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (state, api_url, storage_url) = (state.clone(), api_url.clone(), storage_url.clone());
                    std::thread::spawn(move || {
                        let mut stream = stream;
                        if let Some(req) = read_request(&mut stream) {
                            handle(&state, &api_url, &storage_url, is_api, req, &mut stream);
                        }
                    });
                }
            });
        }
        hub
    }

    fn client(&self, token: Option<&str>) -> HubClient {
        let mut c = HubClient::new(&self.api, token.map(String::from));
        c.backoff = Duration::from_millis(20);
        c.attempts = 4;
        c
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn count(&self, prefix: &str) -> usize {
        self.with(|s| s.log.iter().filter(|l| l.starts_with(prefix)).count())
    }
}

fn handle(state: &Mutex<State>, api: &str, storage: &str, is_api: bool, req: Http, stream: &mut TcpStream) {
    let mut s = state.lock().unwrap();
    s.log.push(format!("{} {}", req.method, req.path));
    let auth_ok = req.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {TOKEN}"));
    if !is_api {
        // The storage host: signed URLs, and never the user's token.
        if req.headers.contains_key("authorization") {
            s.violations
                .push(format!("token sent to the storage host: {}", req.path));
        }
        let seg: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        match (req.method.as_str(), seg.as_slice()) {
            ("PUT", ["put", oid]) => {
                if req.headers.get("x-upload-secret").map(String::as_str) != Some(UPLOAD_SECRET) {
                    s.violations.push("basic upload without the action's header".into());
                }
                if s.dropped_puts > 0 {
                    // Drop the connection mid-upload: no answer at all.
                    s.dropped_puts -= 1;
                    return;
                }
                s.pending.insert(oid.to_string(), req.body);
                respond(stream, 200, &[], b"");
            }
            ("PUT", ["part", oid, n]) => {
                let n: u64 = n.parse().unwrap();
                let etag = format!("\"etag-{n}-{}\"", req.body.len());
                s.parts.insert((oid.to_string(), n), req.body);
                respond(stream, 200, &[("ETag", etag)], b"");
            }
            _ => respond(stream, 404, &[], b"no such storage route"),
        }
        return;
    }
    if s.echo_headers {
        let mut seen: Vec<String> = req.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        seen.sort();
        let text = format!("bad credentials; you sent {} for {}", seen.join(", "), req.path);
        respond(stream, 401, &[], text.as_bytes());
        return;
    }
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Downloads of public files need no token; everything else does.
    let is_download = req.method == "GET";
    if !is_download && !auth_ok {
        json_reply(
            stream,
            401,
            json!({"error": "Invalid credentials in Authorization header"}),
        );
        return;
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    match (req.method.as_str(), seg.as_slice()) {
        ("POST", ["api", "repos", "create"]) => {
            if s.forbid_create {
                json_reply(
                    stream,
                    403,
                    json!({"error": "You don't have the rights to create a model under the namespace \"org\""}),
                );
                return;
            }
            let id = format!(
                "{}/{}",
                body["organization"].as_str().unwrap_or(""),
                body["name"].as_str().unwrap_or("")
            );
            if s.repos.contains_key(&id) {
                json_reply(stream, 409, json!({"error": "You already created this model repo"}));
            } else {
                let private = body["private"].as_bool().unwrap_or(false);
                s.repos.insert(
                    id.clone(),
                    Repo {
                        private,
                        ..Default::default()
                    },
                );
                json_reply(stream, 200, json!({"url": format!("{api}/{id}")}));
            }
        }
        ("POST", ["api", "models", owner, name, "preupload", _rev]) => {
            if !s.repos.contains_key(&format!("{owner}/{name}")) {
                json_reply(stream, 404, json!({"error": "Repository not found"}));
                return;
            }
            if s.preupload_500s > 0 {
                s.preupload_500s -= 1;
                json_reply(stream, 500, json!({"error": "Internal Error"}));
                return;
            }
            let mut out = Vec::new();
            for f in body["files"].as_array().unwrap() {
                let sample = BASE64.decode(f["sample"].as_str().unwrap_or("!")).unwrap_or_default();
                let size = f["size"].as_u64().unwrap();
                if sample.len() != 512.min(size as usize) {
                    s.violations
                        .push(format!("preupload sample of {} has {} bytes", f["path"], sample.len()));
                }
                let path = f["path"].as_str().unwrap();
                let lfs = path.ends_with(".safetensors") || size > 1000;
                out.push(json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"}, "shouldIgnore": false}));
            }
            json_reply(stream, 200, json!({"files": out}));
        }
        ("POST", [owner, repo_git, "info", "lfs", "objects", "batch"]) => {
            let repo = format!("{owner}/{}", repo_git.trim_end_matches(".git"));
            for h in ["accept", "content-type"] {
                if req.headers.get(h).map(String::as_str) != Some("application/vnd.git-lfs+json") {
                    s.violations
                        .push(format!("LFS batch without {h}: application/vnd.git-lfs+json"));
                }
            }
            if body["operation"] != "upload" || body["hash_algo"] != "sha256" {
                s.violations.push(format!("LFS batch body {body}"));
            }
            let mut objects = Vec::new();
            for o in body["objects"].as_array().unwrap() {
                let (oid, size) = (o["oid"].as_str().unwrap().to_string(), o["size"].as_u64().unwrap());
                if s.lfs.contains_key(&(repo.clone(), oid.clone())) {
                    objects.push(json!({"oid": oid, "size": size}));
                    continue;
                }
                let verify = json!({"href": format!("{api}/{repo}/verify/{oid}"), "header": {}});
                let upload = if size > 3000 {
                    let chunk = 2000u64;
                    let mut header = serde_json::Map::new();
                    header.insert("chunk_size".into(), json!(chunk.to_string()));
                    for n in 1..=size.div_ceil(chunk) {
                        header.insert(format!("{n:05}"), json!(format!("{storage}/part/{oid}/{n}")));
                    }
                    json!({"href": format!("{api}/complete/{oid}"), "header": header})
                } else {
                    json!({"href": format!("{storage}/put/{oid}"), "header": {"x-upload-secret": UPLOAD_SECRET}})
                };
                objects.push(json!({"oid": oid, "size": size, "actions": {"upload": upload, "verify": verify}}));
            }
            respond(
                stream,
                200,
                &[("Content-Type", "application/vnd.git-lfs+json".into())],
                json!({"transfer": "basic", "objects": objects}).to_string().as_bytes(),
            );
        }
        ("POST", ["complete", oid]) => {
            let mut whole = Vec::new();
            for (i, p) in body["parts"].as_array().unwrap().iter().enumerate() {
                let n = p["partNumber"].as_u64().unwrap();
                let data = s.parts.get(&(oid.to_string(), n)).cloned().unwrap_or_default();
                if n != i as u64 + 1 || p["etag"].as_str() != Some(&format!("etag-{n}-{}", data.len())) {
                    s.violations.push(format!("multipart completion part {p}"));
                }
                whole.extend(data);
            }
            s.pending.insert(oid.to_string(), whole);
            json_reply(stream, 200, json!({}));
        }
        ("POST", [owner, name, "verify", oid]) => {
            let data = s.pending.remove(*oid).unwrap_or_default();
            if sha256(&data) != *oid || body["size"].as_u64() != Some(data.len() as u64) {
                json_reply(stream, 400, json!({"error": "object does not match its oid or size"}));
                return;
            }
            s.lfs.insert((format!("{owner}/{name}"), oid.to_string()), data);
            json_reply(stream, 200, json!({}));
        }
        ("POST", ["api", "models", owner, name, "commit", _rev]) => {
            let id = format!("{owner}/{name}");
            if req.headers.get("content-type").map(String::as_str) != Some("application/x-ndjson") {
                s.violations.push("commit is not application/x-ndjson".into());
            }
            let text = String::from_utf8(req.body).unwrap();
            let mut lines = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
            let header = lines.next().unwrap();
            if header["key"] != "header" || !header["value"]["summary"].is_string() {
                s.violations.push(format!("commit header {header}"));
            }
            let mut files = BTreeMap::new();
            for op in lines {
                let v = &op["value"];
                let path = v["path"].as_str().unwrap().to_string();
                match op["key"].as_str() {
                    Some("file") if v["encoding"] == "base64" => {
                        files.insert(path, BASE64.decode(v["content"].as_str().unwrap()).unwrap());
                    }
                    Some("lfsFile") if v["algo"] == "sha256" => {
                        match s.lfs.get(&(id.clone(), v["oid"].as_str().unwrap().to_string())) {
                            Some(data) if v["size"].as_u64() == Some(data.len() as u64) => {
                                files.insert(path, data.clone());
                            }
                            _ => {
                                json_reply(
                                    stream,
                                    422,
                                    json!({"error": format!("LFS object of {path} not uploaded")}),
                                );
                                return;
                            }
                        }
                    }
                    _ => s.violations.push(format!("commit operation {op}")),
                }
            }
            let repo = s.repos.get_mut(&id).unwrap();
            repo.files.extend(files);
            repo.commits += 1;
            let pr = query
                .contains("create_pr=1")
                .then(|| format!("{api}/{id}/discussions/1"));
            json_reply(
                stream,
                200,
                json!({"commitUrl": format!("{api}/{id}/commit/{SHA}"), "commitOid": SHA, "pullRequestUrl": pr}),
            );
        }
        ("GET", ["api", "models", owner, name, "revision", _rev]) => {
            let id = format!("{owner}/{name}");
            match s.repos.get(&id) {
                Some(repo) => {
                    let siblings: Vec<Value> = repo.files.keys().map(|f| json!({"rfilename": f})).collect();
                    json_reply(stream, 200, json!({"id": id, "sha": SHA, "siblings": siblings}));
                }
                None => json_reply(stream, 404, json!({"error": "Repository not found"})),
            }
        }
        ("GET", [owner, name, "resolve", sha, rest @ ..]) if *sha == SHA => {
            let id = format!("{owner}/{name}");
            match s.repos.get(&id).and_then(|r| r.files.get(&rest.join("/"))) {
                Some(data) => respond(stream, 200, &[("ETag", format!("\"{}\"", sha256(data)))], data),
                None => json_reply(stream, 404, json!({"error": "Entry not found"})),
            }
        }
        _ => json_reply(stream, 404, json!({"error": format!("no route {} {path}", req.method)})),
    }
}

/// A training output folder: the adapter and card to push, and what a push leaves out.
fn output_folder(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = |n: usize, seed: u8| {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
    };
    let pushed: BTreeMap<String, Vec<u8>> = [
        ("README.md", b"---\nlibrary_name: peft\n---\n# card\n".to_vec()),
        ("adapter_config.json", b"{\"r\": 16}".to_vec()),
        ("adapter_model.safetensors", bytes(5000, 7)), // LFS, multipart (3 parts)
        ("tokenizer.json", bytes(1500, 3)),            // LFS, basic
        ("runs/events.out.tfevents.1", bytes(300, 1)), // regular, in a subfolder
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (name, data) in &pushed {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    for skipped in [
        ".hidden",
        "checkpoint-2/adapter_model.safetensors",
        ".checkpoint-3.tmp/x",
        "ref.bin.tmp",
    ] {
        let p = root.join(skipped);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not pushed").unwrap();
    }
    pushed
}

fn options(repo: &str) -> PushOptions {
    PushOptions {
        repo: repo.into(),
        private: true,
        message: Some("Temper adapter".into()),
        ..Default::default()
    }
}

#[test]
fn push_uploads_the_folder_byte_for_byte_and_skips_known_objects() {
    let hub = MockHub::start();
    let dir = tempfile::tempdir().unwrap();
    let want = output_folder(dir.path());
    let client = hub.client(Some(TOKEN));
    let report = push_folder(&client, dir.path(), &options("me/adapter")).unwrap();
    assert_eq!((report.files, report.lfs_uploaded, report.lfs_skipped), (5, 2, 0));
    assert!(report.commit_url.ends_with(SHA), "{report:?}");
    hub.with(|s| {
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        let repo = &s.repos["me/adapter"];
        assert!(repo.private);
        assert_eq!(repo.files, want, "the Hub holds exactly the folder's files");
        // Three parts of 2000, 2000 and 1000 bytes went to the storage host.
        assert_eq!(s.parts.len(), 3);
    });
    assert_eq!(hub.count("POST /api/repos/create"), 1);

    // Again, as a pull request: the repo exists (409 is fine) and the server has both objects.
    let again = PushOptions {
        create_pr: true,
        ..options("me/adapter")
    };
    let report = push_folder(&client, dir.path(), &again).unwrap();
    assert_eq!((report.lfs_uploaded, report.lfs_skipped), (0, 2));
    assert!(report.pull_request_url.is_some_and(|u| u.ends_with("/discussions/1")));
    assert_eq!(hub.with(|s| s.repos["me/adapter"].commits), 2);
    assert_eq!(hub.count("PUT /put/"), 1, "no second upload of a known object");
    // The token never appears in what a user might print.
    assert!(!format!("{client:?}").contains(TOKEN));
}

#[test]
fn push_failures_are_clear_and_leave_nothing_committed() {
    let hub = MockHub::start();
    let dir = tempfile::tempdir().unwrap();
    output_folder(dir.path());

    // No token: refused before any request.
    let err = push_folder(&hub.client(None), dir.path(), &options("me/a")).unwrap_err();
    assert!(matches!(err, Error::NoToken { .. }), "{err}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    assert_eq!(hub.count(""), 0);

    // A rejected token: one request (no retries), the status and the Hub's message.
    let err = push_folder(&hub.client(Some("hf_wrong")), dir.path(), &options("me/a")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Unauthorized { status: 401, .. }), "{text}");
    assert!(
        text.contains("Invalid credentials") && !text.contains("hf_wrong"),
        "{text}"
    );
    assert_eq!(hub.count(""), 1);

    // No right to create the repository.
    hub.with(|s| s.forbid_create = true);
    let err = push_folder(&hub.client(Some(TOKEN)), dir.path(), &options("org/a")).unwrap_err();
    assert!(matches!(err, Error::Unauthorized { status: 403, .. }), "{err}");
    assert!(err.to_string().contains("rights to create"), "{err}");
    hub.with(|s| s.forbid_create = false);

    // A server error, then success: retried with backoff.
    hub.with(|s| s.preupload_500s = 2);
    push_folder(&hub.client(Some(TOKEN)), dir.path(), &options("me/b")).unwrap();
    assert_eq!(hub.count("POST /api/models/me/b/preupload/main"), 3);

    // The connection dropped in the middle of an upload, then success.
    hub.with(|s| s.dropped_puts = 1);
    push_folder(&hub.client(Some(TOKEN)), dir.path(), &options("me/c")).unwrap();
    assert_eq!(hub.count("PUT /put/"), 3, "b's upload, c's dropped one and its retry");
    assert_eq!(hub.with(|s| s.repos["me/c"].files.len()), 5);

    // An upload that keeps failing: an error naming the request, and no commit.
    hub.with(|s| s.dropped_puts = 100);
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::write(dir2.path().join("tokenizer.json"), vec![9u8; 2000]).unwrap();
    let err = push_folder(&hub.client(Some(TOKEN)), dir2.path(), &options("me/d")).unwrap_err();
    assert!(matches!(err, Error::Network { attempts: 4, .. }), "{err}");
    assert!(err.to_string().contains("PUT"), "{err}");
    assert_eq!(hub.with(|s| s.repos["me/d"].commits), 0);
    assert!(hub.with(|s| s.violations.is_empty()));

    // A symbolic link out of the folder: refused before anything is sent.
    let before = hub.count("");
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("escape")).unwrap();
    let err = push_folder(&hub.client(Some(TOKEN)), dir.path(), &options("me/e")).unwrap_err();
    assert!(err.to_string().contains("links outside the folder"), "{err}");
    assert_eq!(hub.count(""), before);
    assert!(matches!(
        push_folder(&hub.client(Some(TOKEN)), dir.path(), &options("../etc")),
        Err(Error::BadRepoId(_))
    ));
}

/// A server that echoes the request back, and an `HF_ENDPOINT` with credentials in it: the
/// token and the password never reach the error text.
#[test]
fn errors_never_show_the_token_or_url_credentials() {
    let hub = MockHub::start();
    hub.with(|s| s.echo_headers = true);
    let dir = tempfile::tempdir().unwrap();
    output_folder(dir.path());
    let secret = "hf_echoedSecret0123456789";
    let err = push_folder(&hub.client(Some(secret)), dir.path(), &options("me/a")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Unauthorized { status: 401, .. }), "{text}");
    assert!(
        text.contains("bad credentials") && text.contains("authorization: ***"),
        "{text}"
    );
    assert!(!text.contains(secret) && !text.contains("echoedSecret"), "{text}");

    // Credentials in the endpoint's URL, and a token that does not look like one.
    let with_password = hub.api.replace("http://", "http://alice:pa55word@");
    let client = HubClient::new(&with_password, Some("plainsecretvalue".into()));
    let err = push_folder(&client, dir.path(), &options("me/b")).unwrap_err();
    let text = err.to_string();
    assert!(
        !text.contains("pa55word") && !text.contains("plainsecretvalue"),
        "{text}"
    );
    assert!(text.contains("http://***@127.0.0.1"), "{text}");
}

#[test]
fn redaction_covers_the_shapes_a_secret_is_echoed_in() {
    use temper_hub::error::redact;
    for (given, hidden) in [
        ("Authorization: Bearer abc.def-ghi", "abc.def"),
        (r#"{"authorization":"Basic dXNlcjpwYXNz"}"#, "dXNlcjpwYXNz"),
        ("token=hf_AbCdEf123456 rest", "AbCdEf123456"),
        ("see https://bob:hunter2@hub.example/api", "hunter2"),
        ("password: hunter3", "hunter3"),
    ] {
        let shown = redact(given);
        assert!(!shown.contains(hidden), "{given} -> {shown}");
        assert!(shown.contains("***"), "{given} -> {shown}");
    }
    // Ordinary messages pass unchanged.
    let plain = "the Hub refused the token (401): Invalid credentials in Authorization header";
    assert_eq!(redact(plain), plain);
}

fn fixture_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-cache")
}

#[test]
fn the_cache_python_wrote_is_found_offline() {
    let cache = fixture_cache();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let by_branch = resolve_in(&cache, None, RepoType::Model, "temper-test/tiny-model", None).unwrap();
    let by_sha = resolve_in(&cache, None, RepoType::Model, "temper-test/tiny-model", Some(sha)).unwrap();
    assert_eq!(by_branch, by_sha);
    assert!(by_branch.ends_with(format!("models--temper-test--tiny-model/snapshots/{sha}")));
    let config = std::fs::read_to_string(by_branch.join("config.json")).unwrap();
    assert!(config.contains("\"hidden_size\": 8"), "{config}");
    assert_eq!(
        std::fs::read(by_branch.join("sub/notes.txt")).unwrap(),
        b"weights for tests\n"
    );
    let data = resolve_in(&cache, None, RepoType::Dataset, "temper-test/tiny-data", None).unwrap();
    assert!(data.join("train.jsonl").is_file());
    // And read back from the folder, as the model card names its datasets.
    assert_eq!(
        temper_hub::repo_of_snapshot(&data),
        Some((RepoType::Dataset, "temper-test/tiny-data".to_string()))
    );
    assert_eq!(temper_hub::repo_of_snapshot(&cache.join("temper-test")), None);
    // Offline and not there: the error names the repo, the revision and the cache.
    let err = resolve_in(&cache, None, RepoType::Model, "temper-test/tiny-model", Some("v2")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("temper-test/tiny-model") && text.contains("v2") && text.contains("HF_HUB_OFFLINE"),
        "{text}"
    );
}

#[test]
fn a_download_lands_in_the_same_layout() {
    let hub = MockHub::start();
    let dir = tempfile::tempdir().unwrap();
    let want = output_folder(dir.path());
    push_folder(&hub.client(Some(TOKEN)), dir.path(), &options("me/model")).unwrap();

    let cache = tempfile::tempdir().unwrap();
    let client = hub.client(Some(TOKEN));
    let snapshot = resolve_in(cache.path(), Some(&client), RepoType::Model, "me/model", None).unwrap();
    let root = cache.path().join("models--me--model");
    assert_eq!(snapshot, root.join("snapshots").join(SHA));
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), SHA);
    for (name, data) in &want {
        let link = snapshot.join(name);
        assert_eq!(&std::fs::read(&link).unwrap(), data, "{name}");
        // Linked into blobs/ by a relative path, named by the content's ETag (its sha256 here).
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.starts_with(".."), "{target:?}");
        assert_eq!(target.file_name().unwrap().to_str().unwrap(), sha256(data));
    }
    // From now on it is found without the Hub.
    let gets = hub.count("GET ");
    assert_eq!(
        resolve_in(cache.path(), None, RepoType::Model, "me/model", None).unwrap(),
        snapshot
    );
    assert_eq!(hub.count("GET "), gets);
    // A missing repository is the Hub's 404, by URL.
    let err = resolve_in(cache.path(), Some(&client), RepoType::Model, "me/nothing", None).unwrap_err();
    assert!(
        err.to_string().contains("404") && err.to_string().contains("me/nothing"),
        "{err}"
    );
}
