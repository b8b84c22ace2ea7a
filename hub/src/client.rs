//! An HTTP client for the Hub: the endpoint and token as `huggingface_hub` finds them, the token
//! sent to that endpoint only, and retries with backoff for transient failures.

use std::io::Read;

use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// `HF_HOME`, or `$XDG_CACHE_HOME/huggingface`, or `~/.cache/huggingface`.
pub(crate) fn hf_home() -> PathBuf {
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("huggingface")
}

/// The token file `huggingface-cli login` writes: `HF_TOKEN_PATH`, or `$HF_HOME/token`.
pub(crate) fn token_path() -> PathBuf {
    std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"))
}

/// `HF_TOKEN`, else the token file's content; `None` when neither holds one.
pub fn token_from_env() -> Option<String> {
    let from_env = std::env::var("HF_TOKEN").ok();
    let from_file = || std::fs::read_to_string(token_path()).ok();
    from_env
        .or_else(from_file)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// A response: status, the headers the protocol needs, and the body.
pub(crate) struct Reply {
    pub status: u16,
    pub etag: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self, url: &str) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Protocol {
            url: url.to_string(),
            message: format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            ),
        })
    }
}

/// How one request is made.
pub(crate) struct Request<'a> {
    pub method: &'static str,
    pub url: &'a str,
    pub headers: Vec<(String, String)>,
    pub body: Option<&'a [u8]>,
}

/// A client of one Hub endpoint.
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// Attempts for a request that fails transiently (network error, 429, 5xx).
    pub attempts: u32,
    /// The first retry's wait; doubled each time.
    pub backoff: Duration,
}

impl std::fmt::Debug for HubClient {
    // The token stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl HubClient {
    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .user_agent(concat!("temper/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        if let Some(token) = &token {
            crate::error::register_secret(token);
        }
        HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }

    /// `HF_ENDPOINT` (default `https://huggingface.co`) and the token from `HF_TOKEN` or the
    /// token file.
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        HubClient::new(&endpoint, token_from_env())
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub(crate) fn require_token(&self) -> Result<()> {
        match self.token {
            Some(_) => Ok(()),
            None => Err(Error::NoToken { path: token_path() }),
        }
    }

    /// Whether `url` is on the configured endpoint (scheme, host and port), the only place the
    /// token may go: LFS uploads often go to storage hosts that must not see it.
    fn is_endpoint(&self, url: &str) -> bool {
        url == self.endpoint
            || url
                .strip_prefix(&self.endpoint)
                .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('?'))
    }

    /// Runs `once` until it succeeds, fails for good, or the attempts run out, waiting with
    /// exponential backoff between tries; `Transient` failures (network errors, 429, 5xx) are
    /// retried, and the last one's message ends up in the `Network` error.
    fn retrying<T>(&self, method: &'static str, url: &str, mut once: impl FnMut() -> Attempt<T>) -> Result<T> {
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 1..=self.attempts.max(1) {
            if attempt > 1 {
                std::thread::sleep(wait);
                wait *= 2;
            }
            match once() {
                Attempt::Done(t) => return Ok(t),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Transient(message) => last = message,
            }
        }
        Err(Error::Network {
            method,
            url: url.to_string(),
            message: last,
            attempts: self.attempts.max(1),
        })
    }

    /// A request to `url`, with the token when (and only when) `url` is on the endpoint.
    fn builder(&self, method: &str, url: &str) -> ureq::http::request::Builder {
        let builder = ureq::http::Request::builder().method(method).uri(url);
        match (&self.token, self.is_endpoint(url)) {
            (Some(token), true) => builder.header("authorization", format!("Bearer {token}")),
            _ => builder,
        }
    }

    /// One request, retried on network errors, 429 and 5xx. Other statuses return to the
    /// caller; 401/403 become `Unauthorized`.
    pub(crate) fn send(&self, req: Request<'_>) -> Result<Reply> {
        self.retrying(req.method, req.url, || match self.send_once(&req) {
            Ok(reply) if is_transient(reply.status) => {
                Attempt::Transient(format!("{} {}", reply.status, message_of(&reply.body)))
            }
            Ok(reply) if is_refusal(reply.status) => Attempt::Fatal(Error::Unauthorized {
                method: req.method,
                url: req.url.to_string(),
                status: reply.status,
                message: message_of(&reply.body),
            }),
            Ok(reply) => Attempt::Done(reply),
            Err(e) => Attempt::Transient(e),
        })
    }

    fn send_once(&self, req: &Request<'_>) -> std::result::Result<Reply, String> {
        let mut builder = self.builder(req.method, req.url);
        for (k, v) in &req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let body = req.body.unwrap_or(&[]).to_vec();
        let request = builder.body(body).map_err(|e| e.to_string())?;
        let response = self.agent.run(request).map_err(|e| e.to_string())?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_matches('"').to_string())
        };
        let (status, etag) = (response.status().as_u16(), header("etag"));
        let mut body = Vec::new();
        response
            .into_body()
            .into_reader()
            .read_to_end(&mut body)
            .map_err(|e| e.to_string())?;
        Ok(Reply { status, etag, body })
    }

    /// GET `url` into the file `dest` (streamed, retried like `send`); returns the reply's
    /// `X-Linked-Etag` (an LFS file's sha256) or else its `ETag`.
    pub(crate) fn download(&self, url: &str, dest: &std::path::Path) -> Result<Option<String>> {
        self.retrying("GET", url, || {
            let request = match self.builder("GET", url).body(()) {
                Ok(r) => r,
                Err(e) => {
                    return Attempt::Fatal(Error::Protocol {
                        url: url.to_string(),
                        message: e.to_string(),
                    });
                }
            };
            let response = match self.agent.run(request) {
                Ok(r) => r,
                Err(e) => return Attempt::Transient(e.to_string()),
            };
            let status = response.status().as_u16();
            if is_transient(status) {
                return Attempt::Transient(status.to_string());
            }
            if !(200..300).contains(&status) {
                let mut body = Vec::new();
                let _ = response.into_body().into_reader().take(4096).read_to_end(&mut body);
                let (method, url, message) = ("GET", url.to_string(), message_of(&body));
                return Attempt::Fatal(if is_refusal(status) {
                    Error::Unauthorized {
                        method,
                        url,
                        status,
                        message,
                    }
                } else {
                    Error::Http {
                        method,
                        url,
                        status,
                        message,
                    }
                });
            }
            let tag = ["x-linked-etag", "etag"].iter().find_map(|name| {
                response
                    .headers()
                    .get(*name)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string())
            });
            let mut file = match std::fs::File::create(dest) {
                Ok(f) => f,
                Err(e) => return Attempt::Fatal(Error::io(dest, e)),
            };
            match std::io::copy(&mut response.into_body().into_reader(), &mut file) {
                Ok(_) => Attempt::Done(tag),
                Err(e) => Attempt::Transient(e.to_string()),
            }
        })
    }

    /// A request whose non-2xx answers are errors.
    pub(crate) fn expect_ok(&self, req: Request<'_>) -> Result<Reply> {
        let (method, url) = (req.method, req.url.to_string());
        let reply = self.send(req)?;
        if !(200..300).contains(&reply.status) {
            return Err(Error::Http {
                method,
                url,
                status: reply.status,
                message: message_of(&reply.body),
            });
        }
        Ok(reply)
    }
}

/// One try of a retried request.
enum Attempt<T> {
    Done(T),
    /// Worth another try (network error, 429, 5xx): the message.
    Transient(String),
    Fatal(Error),
}

fn is_transient(status: u16) -> bool {
    status == 429 || status >= 500
}

fn is_refusal(status: u16) -> bool {
    status == 401 || status == 403
}

/// The Hub's error message (`{"error": ...}`) or the start of the body.
fn message_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string())
}

/// Percent-encodes one path segment (a revision such as `refs/pr/1` becomes `refs%2Fpr%2F1`).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `s` reads as a Hub repository id, `OWNER/NAME`.
pub fn is_repo_id(s: &str) -> bool {
    check_repo_id(s).is_ok()
}

/// Checks `OWNER/NAME` (letters, digits, `-`, `_`, `.`; no `..`, no leading `-` or `.`).
pub(crate) fn check_repo_id(repo: &str) -> Result<(&str, &str)> {
    let bad = || Error::BadRepoId(repo.to_string());
    let (owner, name) = repo.split_once('/').ok_or_else(bad)?;
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.contains("..")
            && !part.starts_with(['-', '.'])
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if ok(owner) && ok(name) {
        Ok((owner, name))
    } else {
        Err(bad())
    }
}

/// The hex SHA-256 of a file (the LFS object id), read in 1 MiB pieces.
pub(crate) fn sha256_file(path: &std::path::Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
