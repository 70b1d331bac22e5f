//! `idem journal list|forget`: inspect and clear the journal.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use idempotent_retry::journal::{OpState, Record, SqliteJournal};
use idempotent_retry::time::rfc3339;

use crate::common::{Exit, Failed, Format, fail, fail_with};

pub const EXAMPLES: &str = "\
Examples:
  idem journal list                     # every operation: state, status, key fingerprint
  idem journal list --pending           # only those a re-run would resume (waiting ones too)
  idem journal list --output json       # full records, keys included
  idem journal forget 'POST https://cloud.example/cvms #3f2a9c1d0b7e'";

/// `idem journal` subcommands.
#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// List the operations in the journal.
    #[command(after_long_help = EXAMPLES)]
    List(ListArgs),
    /// Remove an operation from the journal (its next run gets a new key).
    #[command(after_long_help = EXAMPLES)]
    Forget(ForgetArgs),
}

/// Which journal.
#[derive(Debug, Args)]
pub struct Where {
    /// The journal file [default: $XDG_STATE_HOME/idempotent-retry/journal.sqlite3].
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
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

fn open(at: &Where) -> Result<SqliteJournal, Failed> {
    let path = match &at.journal {
        Some(path) => path.clone(),
        None => {
            SqliteJournal::default_path().ok_or_else(|| fail(Exit::Usage, "no home directory; pass --journal PATH"))?
        }
    };
    SqliteJournal::open_existing(&path).map_err(|e| fail_with(Exit::Usage, &e))
}

pub fn run(command: JournalCommand) -> Exit {
    match command {
        JournalCommand::List(args) => list(&args).unwrap_or_else(|failed| failed.end(args.output)),
        JournalCommand::Forget(args) => forget(&args).unwrap_or_else(|failed| failed.end(Format::Text)),
    }
}

fn list(args: &ListArgs) -> Result<Exit, Failed> {
    use idempotent_retry::journal::KeyStore;
    let journal = open(&args.at)?;
    let records = journal.list().map_err(|e| fail_with(Exit::Usage, &e))?;
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

fn forget(args: &ForgetArgs) -> Result<Exit, Failed> {
    use idempotent_retry::journal::KeyStore;
    let journal = open(&args.at)?;
    match journal.forget(&args.operation).map_err(|e| fail_with(Exit::Usage, &e))? {
        true => {
            eprintln!("idem: forgot {}", args.operation);
            Ok(Exit::Ok)
        }
        false => {
            Err(fail(Exit::Refused, format!("no operation named {:?} in {}", args.operation, journal.path().display())))
        }
    }
}
