//! `idem post URL`: one POST with an idempotency key, retried safely.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use idempotent_retry::{Error, GitKeyMode, IdempotencyKey, OperationError, Outcome, key_from_git};
use serde_json::json;

use crate::common::{self, Exit, Format, SharedArgs, body_value, fail};

pub const EXAMPLES: &str = "\
Examples:
  # Create a CVM; a retry after a lost response is a replay, not a second CVM
  idem post https://cloud.example/cvms --json '{\"name\":\"web-1\"}' -H 'Authorization: Bearer $TOKEN'

  # Deploy the checked-out commit: the key is the clean HEAD SHA (none if the tree is dirty)
  idem post https://deploy.example/apps/api/deploy --key-from-git --key-header X-Tower-Idempotency-Key

  # Upload a report whose key goes in the body, from a file, printing one JSON summary
  idem post https://bench.example/v0/run --json @report.json --key-field idempotency_key --output json

Running the same command again while the journal holds it as pending (a crash, a kill -9, a
CI retry) resumes its key: the server answers with the original instead of creating twice.";

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
    /// A header, 'Name: value'. Repeatable.
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

pub async fn run(args: PostArgs) -> Exit {
    match post(args).await {
        Ok(exit) | Err(exit) => exit,
    }
}

async fn post(args: PostArgs) -> Result<Exit, Exit> {
    // Everything that can be wrong with the input is found before anything is sent.
    let (body, json_body) = match (&args.json, &args.data_binary) {
        (Some(json), _) => (common::json_body(json)?, true),
        (None, Some(data)) => (common::read_value(data, "--data-binary")?, false),
        (None, None) => (Vec::new(), false),
    };
    let headers = common::headers(&args.headers)?;
    let explicit = match &args.idempotency_key {
        Some(key) => Some(
            IdempotencyKey::new(key.clone())
                .map_err(|e| fail(Exit::Usage, format!("--idempotency-key: {e}; nothing was sent")))?,
        ),
        None => None,
    };
    let git_key = match &args.key_from_git {
        Some(dir) => match key_from_git(dir, GitKeyMode::CleanOnly) {
            Ok(key) => Some(key),
            Err(why) => {
                eprintln!("idem: no idempotency key from git: {why}; sending without one");
                None
            }
        },
        None => None,
    };
    let keyless = args.no_idempotency_key || (args.key_from_git.is_some() && git_key.is_none());

    let deadline = args.shared.retry.deadline_or(60.0)?;
    let layer = common::layer(&args.shared.carrier, &args.shared.retry, deadline, args.shared.output.quiet)?;
    let (store, journal_path) = common::store(&args.shared.journal)?;
    let ops = common::operations(layer, store, &args.shared.scope, args.shared.retry.retention, headers)?;
    let name = format!("POST {} #{}", args.url, common::short_hash("POST", &args.url, &body));
    let mut op = ops.operation(name).post(&args.url).body(body);
    if json_body {
        op = op.header("content-type", "application/json");
    }
    op = match (explicit.or(git_key), keyless) {
        (Some(key), _) => op.key(key),
        (None, true) => op.no_key(),
        (None, false) => op.random_key(),
    };

    let quiet = args.shared.output.quiet;
    let json = args.shared.output.output == Format::Json;
    let emit = |outcome: &str,
                status: Option<u16>,
                attempts: u32,
                key: Option<&IdempotencyKey>,
                replayed: bool,
                body: &[u8]| {
        if json {
            let value = json!({
                "outcome": outcome,
                "status": status,
                "attempts": attempts,
                "idempotency_key": key.map(IdempotencyKey::as_str),
                "replayed": replayed,
                "body": if body.is_empty() && status.is_none() { serde_json::Value::Null } else { body_value(body) },
            });
            println!("{value}");
        } else {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(body);
            let _ = stdout.flush();
        }
    };

    match op.send().await {
        Ok(done) => {
            let replayed = done.outcome == Outcome::Replayed;
            if replayed && !quiet {
                let key = done.key.as_ref().map(|k| format!(" (key sha256:{})", k.fingerprint())).unwrap_or_default();
                eprintln!("idem: the server replayed its earlier response{key}");
            }
            let outcome = if replayed { "replayed" } else { "created" };
            emit(outcome, done.status.map(|s| s.as_u16()), done.attempts, done.key.as_ref(), replayed, &done.body);
            Ok(Exit::Ok)
        }
        Err(OperationError::Rejected { status, body, attempts, key, .. }) => {
            if !quiet {
                eprintln!("idem: the server refused the request with {status}");
            }
            emit("rejected", Some(status.as_u16()), attempts, key.as_ref(), false, &body);
            Ok(Exit::Refused)
        }
        Err(e @ OperationError::IdentityMismatch(_)) => Err(fail(Exit::Refused, e)),
        Err(
            e @ (OperationError::InvalidOptions { .. }
            | OperationError::Journal(_)
            | OperationError::PayloadMismatch(_)),
        ) => Err(fail(Exit::Usage, e)),
        Err(OperationError::Failed { source, key, may_have_been_applied, .. }) => {
            let typed = Error::find(&source);
            if let Some(Error::InvalidKey(_) | Error::InvalidRequest(_)) = typed {
                return Err(fail(Exit::Usage, typed.expect("matched")));
            }
            let attempts = typed.map_or(1, Error::attempts);
            let status = typed.and_then(Error::status).map(|s| s.as_u16());
            eprintln!("idem: {}", chain(&source));
            explain_rerun(may_have_been_applied, key.as_ref(), journal_path.as_ref());
            emit("unknown", status, attempts, key.as_ref(), false, b"");
            Ok(Exit::Unknown)
        }
        Err(e) => {
            let key = e.idempotency_key().cloned();
            eprintln!("idem: {e}");
            explain_rerun(e.may_have_been_applied(), key.as_ref(), journal_path.as_ref());
            emit("unknown", None, 0, key.as_ref(), false, b"");
            Ok(Exit::Unknown)
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
        (None, _) if may_have_been_applied => {
            eprintln!(
                "idem: {applied}, and the request carried no key: re-running it is NOT safe; check the server first"
            )
        }
        (None, _) => eprintln!("idem: {applied}; re-running is safe"),
    }
}

/// An error and its causes on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}
