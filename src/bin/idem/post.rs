//! `idem post URL`: one POST with an idempotency key, retried safely.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use idempotent_retry::{
    Error, IdempotencyKey, ServerConvention,
    operation::{Completed, GitKeyMode, OperationBuilder, OperationError, Resolution},
};
use reqwest::header::HeaderMap;
use serde_json::json;

use crate::common::{self, Exit, Format, SharedArgs, body_value, fail, fail_with};

pub const EXAMPLES: &str = "\
Examples:
  # Create a CVM; a retry after a lost response is a replay, not a second CVM
  idem post https://cloud.example/cvms --json '{\"name\":\"web-1\"}' -H 'Authorization: Bearer $TOKEN'

  # Deploy the checked-out commit: the key is the clean HEAD SHA (none if the tree is dirty)
  idem post https://deploy.example/apps/api/deploy --key-from-git --server tower

  # Upload a report whose key goes in the body, from a file, printing one JSON summary
  idem post https://bench.example/v0/run --json @report.json --server bencher --output json

  # A django-idempotency-key server: its replays are the stored body under 409
  idem post https://shop.example/orders --json @order.json --server django

Running the same command again while the journal holds it as pending (a crash, a kill -9, a
CI retry) resumes its key: the server answers with the original instead of creating twice.
A run whose outcome is unknown and that cannot be resumed (it was sent without a key) is never
sent again: check the server, then `idem journal forget` it.";

/// `idem post` options.
#[derive(Debug, Args)]
pub struct PostArgs {
    /// The URL to POST to.
    pub url: String,
    /// A JSON body: the JSON itself, @FILE, or @- for stdin. Invalid JSON exits 2.
    #[arg(long, value_name = "BODY", conflicts_with = "data_binary")]
    pub json: Option<String>,
    /// An opaque body: @FILE, @- for stdin, or the bytes themselves.
    #[arg(long, value_name = "@FILE")]
    pub data_binary: Option<String>,
    /// A header, 'Name: value'. Repeatable. A header named like the key's is the key to send.
    #[arg(short = 'H', long = "header", value_name = "'Name: value'")]
    pub headers: Vec<String>,
    /// Send this key. A bad key exits 2 before anything is sent.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["no_idempotency_key", "key_from_git"])]
    pub idempotency_key: Option<String>,
    /// Send no key. A lost response then exits 3: the outcome is unknown.
    #[arg(long, conflicts_with = "key_from_git")]
    pub no_idempotency_key: bool,
    /// Use the clean HEAD SHA of the git working tree at DIR (default: .) as the key. On a dirty
    /// tree or outside a repository no key is sent, and stderr says why.
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true, default_missing_value = ".")]
    pub key_from_git: Option<PathBuf>,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// Where the key comes from.
enum KeyChoice {
    Given(IdempotencyKey),
    Git(PathBuf),
    None,
    Random,
}

/// What is sent, read and checked before anything is.
struct Input {
    body: Vec<u8>,
    json: bool,
    /// Sent on every request; the key's own header is taken out (it is the key).
    headers: HeaderMap,
    key: KeyChoice,
}

pub async fn run(args: PostArgs) -> Exit {
    match post(args).await {
        Ok(exit) | Err(exit) => exit,
    }
}

async fn post(args: PostArgs) -> Result<Exit, Exit> {
    let convention = args.shared.carrier.convention()?;
    let input = Input::read(&args, &convention)?;
    let deadline = args.shared.retry.deadline_or(60.0)?;
    let layer = common::layer(&convention, &args.shared.retry, deadline, args.shared.output.quiet)?;
    let (store, journal_path) = common::store(&args.shared.journal)?;
    let ops = common::operations(layer, store, &args.shared.scope, args.shared.retry.retention, input.headers.clone())?;
    let name = common::operation_name("POST", &args.url, &input.body);
    let result = input.operation(ops.operation(name).post(&args.url)).send().await;
    let report = Report { json: args.shared.output.output == Format::Json, quiet: args.shared.output.quiet };
    Ok(report.tell(result, journal_path.as_ref()))
}

impl Input {
    /// Everything that can be wrong with the input is found here, before anything is sent.
    fn read(args: &PostArgs, convention: &ServerConvention) -> Result<Self, Exit> {
        let (body, json) = match (&args.json, &args.data_binary) {
            (Some(json), _) => (common::json_body(json)?, true),
            (None, Some(data)) => (common::read_value(data, "--data-binary")?, false),
            (None, None) => (Vec::new(), false),
        };
        let mut headers = common::headers(&args.headers)?;
        let in_header = Self::key_in_headers(&mut headers, convention)?;
        let flag = match &args.idempotency_key {
            Some(key) => Some(
                IdempotencyKey::with_max_len(key.clone(), convention.max_key_len)
                    .map_err(|e| fail(Exit::Usage, format!("--idempotency-key: {e}; nothing was sent")))?,
            ),
            None => None,
        };
        let given = match (flag, in_header) {
            (Some(a), Some(b)) if a != b => {
                return Err(fail(
                    Exit::Usage,
                    "-H gives one idempotency key and --idempotency-key another; nothing was sent",
                ));
            }
            (a, b) => a.or(b),
        };
        let key = match (given, &args.key_from_git, args.no_idempotency_key) {
            (Some(_), Some(_), _) | (Some(_), _, true) => {
                return Err(fail(
                    Exit::Usage,
                    "-H gives an idempotency key, and another key source is named; nothing was sent",
                ));
            }
            (Some(key), None, false) => KeyChoice::Given(key),
            (None, Some(dir), _) => KeyChoice::Git(dir.clone()),
            (None, None, true) => KeyChoice::None,
            (None, None, false) if convention.carrier.is_none() => KeyChoice::None,
            (None, None, false) => KeyChoice::Random,
        };
        if convention.carrier.is_none() && !matches!(key, KeyChoice::None) {
            return Err(fail(Exit::Usage, format!("the {} server takes no key; nothing was sent", convention.name)));
        }
        Ok(Self { body, json, headers, key })
    }

    /// The key a `-H` option carries in the key's own header, taken out of the headers.
    fn key_in_headers(headers: &mut HeaderMap, convention: &ServerConvention) -> Result<Option<IdempotencyKey>, Exit> {
        let Some(carrier) = &convention.carrier else { return Ok(None) };
        let Some(name) = carrier.header_name().cloned() else { return Ok(None) };
        let key = carrier
            .existing_key(headers, None, convention.max_key_len)
            .map_err(|e| fail(Exit::Usage, format!("-H {name}: {e}")))?;
        headers.remove(&name);
        Ok(key)
    }

    /// The operation to send.
    fn operation<'a>(&self, op: OperationBuilder<'a>) -> OperationBuilder<'a> {
        let mut op = op.body(self.body.clone());
        if self.json {
            op = op.header("content-type", "application/json");
        }
        match &self.key {
            KeyChoice::Given(key) => op.key(key.clone()),
            KeyChoice::Git(dir) => op.key_from_git(dir, GitKeyMode::CleanOnly),
            KeyChoice::None => op.no_key(),
            KeyChoice::Random => op.random_key(),
        }
    }
}

/// How the outcome is told.
struct Report {
    json: bool,
    quiet: bool,
}

impl Report {
    fn tell(&self, result: Result<Completed, OperationError>, journal: Option<&PathBuf>) -> Exit {
        match result {
            Ok(done) => self.done(&done),
            Err(OperationError::Rejected { status, body, attempts, key, key_reuse, .. }) => {
                if !self.quiet {
                    eprintln!("idem: the server refused the request with {status}");
                }
                if key_reuse {
                    eprintln!(
                        "idem: the server says this key was used before with another payload: it will refuse this key with this body for as long as it keeps the key; use another key"
                    );
                }
                self.emit("rejected", Some(status.as_u16()), attempts, key.as_ref(), &body);
                Exit::Refused
            }
            Err(e @ (OperationError::IdentityMismatch(_) | OperationError::Gone { .. })) => {
                fail_with(Exit::Refused, &e)
            }
            Err(
                e @ (OperationError::InvalidOptions { .. }
                | OperationError::Journal(_)
                | OperationError::PayloadMismatch(_)),
            ) => fail_with(Exit::Usage, &e),
            Err(e) => {
                let typed = match &e {
                    OperationError::GaveUp { source, .. } => Error::find(source),
                    _ => None,
                };
                let key = e.idempotency_key().cloned();
                eprintln!("idem: {}", idempotent_retry::error::chain(&e));
                explain_rerun(e.may_have_been_applied(), key.as_ref(), journal);
                let status = typed.and_then(Error::status).map(|s| s.as_u16());
                self.emit("unknown", status, typed.map_or(0, Error::attempts), key.as_ref(), b"");
                Exit::Unknown
            }
        }
    }

    fn done(&self, done: &Completed) -> Exit {
        if let Some(why) = &done.no_key_reason {
            eprintln!("idem: no idempotency key from git: {why}; it was sent without one");
        }
        let outcome = done.resolution.as_str();
        if done.resolution != Resolution::Created && !self.quiet {
            let key = done.key.as_ref().map(|k| format!(" (key sha256:{})", k.fingerprint())).unwrap_or_default();
            match done.resolution {
                Resolution::Replayed => eprintln!("idem: the server replayed its earlier response{key}"),
                Resolution::Resumed => {
                    eprintln!("idem: created by an earlier run{key}, which was waiting for it; nothing was sent")
                }
                _ => eprintln!("idem: done earlier, by the journal's record{key}; nothing was sent"),
            }
        }
        let status = done.status.map(|s| s.as_u16());
        self.emit(outcome, status, done.attempts, done.key.as_ref(), &done.body);
        Exit::Ok
    }

    fn emit(&self, outcome: &str, status: Option<u16>, attempts: u32, key: Option<&IdempotencyKey>, body: &[u8]) {
        if self.json {
            let value = json!({
                "outcome": outcome,
                "status": status,
                "attempts": attempts,
                "idempotency_key": key.map(IdempotencyKey::as_str),
                "replayed": outcome == "replayed",
                "body": if body.is_empty() && status.is_none() { serde_json::Value::Null } else { body_value(body) },
            });
            println!("{value}");
        } else {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(body);
            let _ = stdout.flush();
        }
    }
}

/// Says whether running the same command again is safe.
fn explain_rerun(may_have_been_applied: bool, key: Option<&IdempotencyKey>, journal: Option<&PathBuf>) {
    let applied = if may_have_been_applied { "it may have been applied" } else { "it was not applied" };
    match (key, journal) {
        (Some(key), Some(path)) => eprintln!(
            "idem: {applied}; re-running the same command is safe: it resumes key sha256:{} from the journal at {}",
            key.fingerprint(),
            path.display()
        ),
        (Some(key), None) => eprintln!(
            "idem: {applied}; re-running is safe only with the same key (there is no journal): --idempotency-key {key}"
        ),
        (None, _) if may_have_been_applied => eprintln!(
            "idem: {applied}, and the request carried no key: re-running it is NOT safe; check the server, then `idem journal forget` the operation"
        ),
        (None, _) => eprintln!("idem: {applied}; re-running is safe"),
    }
}
