//! `idem journal list|forget`: inspect and clear the journal.

use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use idempotent_retry::journal::{OpState, Record};
use idempotent_retry::time::{Clock, SystemClock, rfc3339};

use crate::common::{Exit, Failed, Format, Journal, fail, fail_with};

pub const EXAMPLES: &str = "\
Examples:
  idem journal list                     # every operation: state, status, key fingerprint
  idem journal list --pending           # only those a re-run would resume (waiting ones too)
  idem journal list --output json       # full records, keys included
  idem journal forget 'POST https://cloud.example/cvms #3f2a9c1d0b7e'
  idem journal gc --older-than 30d      # settled records past the server's retention
  IDEM_JOURNAL=postgres://ci@db.internal/deploys idem journal list --scope tenant-42";

/// `idem journal` subcommands.
#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// List the operations in the journal.
    #[command(after_long_help = EXAMPLES)]
    List(ListArgs),
    /// Remove an operation from the journal (its next run gets a new key).
    #[command(after_long_help = EXAMPLES)]
    Forget(ForgetArgs),
    /// Remove settled records older than a duration, so the journal does not grow forever.
    #[command(after_long_help = EXAMPLES)]
    Gc(GcArgs),
}

/// Which journal.
#[derive(Debug, Args)]
pub struct Where {
    /// The journal: a SQLite file, or a postgres:// URL
    /// [default: $XDG_STATE_HOME/idempotent-retry/journal.sqlite3].
    #[arg(long, value_name = "PATH|URL", env = "IDEM_JOURNAL")]
    pub journal: Option<String>,
    /// The scope (account, tenant) whose records to see, in a shared journal.
    #[arg(long, value_name = "SCOPE", default_value = "")]
    pub scope: String,
}

/// `idem journal list` options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only operations a re-run would resume: pending, of unknown outcome, or waiting for
    /// what they created to be ready.
    #[arg(long)]
    pub pending: bool,
    /// The output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    #[command(flatten)]
    pub at: Where,
}

/// `idem journal forget` options.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The operation's name, as `idem journal list` shows it.
    pub operation: String,
    #[command(flatten)]
    pub at: Where,
}

/// `idem journal gc` options.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Remove settled records (succeeded, not applied) last changed longer ago than this:
    /// `90d`, `72h`, `30m`, `600s` or seconds. Choose more than the server keeps keys. A fixed
    /// key's success is kept whatever its age: it keeps that key from being sent again.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub older_than: Duration,
    #[command(flatten)]
    pub at: Where,
}

/// `90d`, `72h`, `30m`, `600s`, or a number of seconds.
fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: expected a number and a unit (d, h, m, s)"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{text:?}: unknown unit {other:?} (d, h, m, s)")),
    };
    n.checked_mul(seconds).map(Duration::from_secs).ok_or_else(|| format!("{text:?}: too long"))
}

async fn open(at: &Where) -> Result<Journal, Failed> {
    Journal::open(at.journal.as_deref(), &at.scope, true, None).await
}

pub async fn run(command: JournalCommand) -> Exit {
    match command {
        JournalCommand::List(args) => list(&args).await.unwrap_or_else(|failed| failed.end(args.output)),
        JournalCommand::Forget(args) => forget(&args).await.unwrap_or_else(|failed| failed.end(Format::Text)),
        JournalCommand::Gc(args) => gc(&args).await.unwrap_or_else(|failed| failed.end(Format::Text)),
    }
}

async fn gc(args: &GcArgs) -> Result<Exit, Failed> {
    let journal = open(&args.at).await?;
    let before = SystemClock.now().checked_sub(args.older_than).unwrap_or(SystemTime::UNIX_EPOCH);
    let removed = match &journal {
        Journal::Sqlite(j) => j.gc(before).await,
        Journal::Postgres(j) => j.gc(before).await,
    }
    .map_err(|e| fail_with(Exit::Usage, &e))?;
    eprintln!("idem: removed {removed} settled record(s) from {}", journal.location());
    Ok(Exit::Ok)
}

async fn list(args: &ListArgs) -> Result<Exit, Failed> {
    let journal = open(&args.at).await?.store();
    let records = journal.list().await.map_err(|e| fail_with(Exit::Usage, &e))?;
    let resumable = |r: &Record| r.state.is_unsettled() || r.state == OpState::Waiting;
    let records: Vec<_> = records.into_iter().filter(|r| !args.pending || resumable(r)).collect();
    match args.output {
        Format::Json => println!("{}", serde_json::to_string(&records).expect("records serialize")),
        Format::Text => {
            println!("{:<10} {:>6}  {:<20}  {:<14}  OPERATION", "STATE", "STATUS", "UPDATED", "KEY");
            for r in &records {
                let key =
                    r.key.as_ref().map_or_else(|| "-".to_owned(), |k| format!("sha256:{}", &k.fingerprint()[..7]));
                let status = r.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
                let waiting = r
                    .handle
                    .as_ref()
                    .map(|h| format!("  (waiting at {} {})", h.pattern(), h.url()))
                    .unwrap_or_default();
                println!(
                    "{:<10} {status:>6}  {:<20}  {key:<14}  {}{waiting}",
                    r.state.as_str(),
                    rfc3339(r.updated_at),
                    r.operation
                );
            }
        }
    }
    Ok(Exit::Ok)
}

async fn forget(args: &ForgetArgs) -> Result<Exit, Failed> {
    let opened = open(&args.at).await?;
    match opened.store().forget(&args.operation).await.map_err(|e| fail_with(Exit::Usage, &e))? {
        true => {
            eprintln!("idem: forgot {}", args.operation);
            Ok(Exit::Ok)
        }
        false => Err(fail(Exit::Refused, format!("no operation named {:?} in {}", args.operation, opened.location()))),
    }
}
