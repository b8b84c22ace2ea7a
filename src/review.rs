//! `temper review`: a local page that shows two models' answers side by side and records a
//! person's choices as preference data (the session: `temper_trainer::eval::review`).

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use temper_trainer::eval::review::{ReviewConfig, Session};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::set;

/// The page: one file, no external assets (answers are inserted as text, never as HTML).
const PAGE: &str = include_str!("review.html");
/// The largest request body accepted (a judgment with a long comment is a few KB).
const MAX_BODY: u64 = 1 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct ReviewArgs {
    /// A review's YAML file (samples, output_dir, sides, rubric, host, port); or flags.
    pub config: Option<PathBuf>,
    /// Override a key: `--set port=9000` (repeatable; values are YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// `eval_samples.jsonl` from `temper eval` (`samples`).
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// Where feedback.jsonl, preferences.jsonl and kto.jsonl go (`output_dir`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The two models compared, as the samples name them (repeat twice; `sides`).
    #[arg(long = "side")]
    pub sides: Vec<String>,
    /// A rubric criterion scored 1-5 (repeatable; the config file also takes descriptions).
    #[arg(long = "rubric")]
    pub rubric: Vec<String>,
    #[arg(long)]
    pub host: Option<String>,
    /// 0: any free port.
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ReviewArgs {
    fn overrides(&self) -> Result<Vec<String>> {
        let mut o = self.set.clone();
        if let Some(s) = &self.samples {
            set(&mut o, "samples", s.display().to_string());
        }
        if let Some(d) = &self.output {
            set(&mut o, "output_dir", d.display().to_string());
        }
        match self.sides.len() {
            0 => {}
            2 => set(&mut o, "sides", self.sides.as_slice()),
            n => bail!("--side: name two models, got {n}"),
        }
        if !self.rubric.is_empty() {
            let list: Vec<Value> = self.rubric.iter().map(|n| json!({"name": n})).collect();
            set(&mut o, "rubric", list);
        }
        if let Some(h) = &self.host {
            set(&mut o, "host", h.as_str());
        }
        if let Some(p) = self.port {
            set(&mut o, "port", p);
        }
        if let Some(s) = self.seed {
            set(&mut o, "seed", s);
        }
        Ok(o)
    }
}

pub fn run(args: ReviewArgs) -> Result<()> {
    let overrides = args.overrides()?;
    let config = ReviewConfig::load(args.config.as_deref(), &overrides)?;
    let (host, port) = (config.host.clone(), config.port);
    let session = Session::open(config, &|w| eprintln!("warning: {w}"))?;
    let server = Server::http((host.as_str(), port))
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("serving on {host}:{port}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server listens on no IP address")?;
    if !addr.ip().is_loopback() {
        eprintln!("warning: serving on {addr}: anyone who can reach it can read the answers and record choices");
    }
    println!(
        "review: http://{addr}/ ({} prompts, {} judged)",
        session.items.len(),
        session.judged()
    );
    eprintln!(
        "review: writing {0}/feedback.jsonl, {0}/preferences.jsonl and {0}/kto.jsonl; Ctrl-C to stop",
        session.config.output_dir.display()
    );
    let session = Arc::new(Mutex::new(session));
    {
        let session = session.clone();
        // Every judgment is on disk before its answer: stopping loses nothing.
        let _ = ctrlc::set_handler(move || {
            if let Ok(s) = session.lock() {
                eprintln!("\nreview: {}", s.summary_text());
            }
            std::process::exit(0);
        });
    }
    // On loopback, only requests addressed to it by name are served (another site's page in
    // the same browser cannot reach it through DNS rebinding); bound elsewhere, on purpose,
    // any host name is.
    let port = addr.port();
    let allowed_hosts: Option<Vec<String>> = addr.ip().is_loopback().then(|| {
        let mut hosts = vec![format!("{addr}"), format!("localhost:{port}")];
        if port == 80 {
            hosts.extend([addr.ip().to_string(), "localhost".into()]);
        }
        hosts
    });
    for request in server.incoming_requests() {
        let response = handle(request, &session, allowed_hosts.as_deref());
        if let Err(e) = response {
            eprintln!("review: {e:#}");
        }
    }
    Ok(())
}

fn json_response(status: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json; charset=utf-8"))
        .with_header(header("Cache-Control", "no-store"))
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid header")
}

fn handle(mut request: Request, session: &Mutex<Session>, allowed_hosts: Option<&[String]>) -> Result<()> {
    let header_value = |name: &'static str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_string())
    };
    let host = header_value("Host").unwrap_or_default();
    let host_ok = allowed_hosts.is_none_or(|hosts| hosts.iter().any(|a| *a == host));
    // A page of another origin may not post here (its Origin names it), and the page is not
    // framed (frame-ancestors), so its keys and buttons cannot be clicked for someone.
    let origin_ok = header_value("Origin").is_none_or(|o| o == format!("http://{host}"));
    if !host_ok || !origin_ok {
        return Ok(request.respond(json_response(403, &json!({"error": "not this server's page"})))?);
    }
    let url = request.url().split('?').next().unwrap_or("").to_string();
    match (request.method(), url.as_str()) {
        (Method::Get, "/") => {
            let page = Response::from_string(PAGE)
                .with_header(header("Content-Type", "text/html; charset=utf-8"))
                .with_header(header(
                    "Content-Security-Policy",
                    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'none'; \
                     frame-ancestors 'none'",
                ))
                .with_header(header("X-Frame-Options", "DENY"))
                .with_header(header("Cache-Control", "no-store"));
            Ok(request.respond(page)?)
        }
        (Method::Get, "/api/state") => {
            let state = session.lock().expect("no panic while locked").state();
            Ok(request.respond(json_response(200, &state))?)
        }
        (Method::Post, "/api/judge") => {
            // A JSON content type makes a cross-site post need a preflight, which fails here.
            let is_json = request
                .headers()
                .iter()
                .any(|h| h.field.equiv("Content-Type") && h.value.as_str().starts_with("application/json"));
            if !is_json {
                return Ok(request.respond(json_response(415, &json!({"error": "send application/json"})))?);
            }
            let mut body = String::new();
            if request.as_reader().take(MAX_BODY + 1).read_to_string(&mut body).is_err() || body.len() as u64 > MAX_BODY {
                return Ok(request.respond(json_response(400, &json!({"error": "the body is not UTF-8 text under 1 MiB"})))?);
            }
            let parsed: Value = match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(e) => return Ok(request.respond(json_response(400, &json!({"error": format!("not JSON: {e}")})))?),
            };
            let mut s = session.lock().expect("no panic while locked");
            let response = match s.judge(&parsed) {
                Err(message) => json_response(400, &json!({"error": message})),
                Ok(Err(e)) => {
                    eprintln!("review: could not record the judgment: {e}");
                    json_response(500, &json!({"error": format!("not recorded: {e}")}))
                }
                Ok(Ok(())) => {
                    eprintln!("review: {}", s.summary_text());
                    json_response(200, &json!({"ok": true, "summary": s.summary()}))
                }
            };
            drop(s);
            Ok(request.respond(response)?)
        }
        _ => Ok(request.respond(json_response(404, &json!({"error": "not found"})))?),
    }
}
