//! Keys from git: the clean HEAD of a working tree (tower's behaviour for deploys).
//!
//! A deploy of commit `3f2a9c1…` is the same deploy however often it is retried or re-run, so
//! the commit is the key. A dirty tree is not a commit: by default it gets no key (the caller
//! is told why), or, with [`GitKeyMode::HashDirty`], a key that hashes HEAD together with the
//! changes, so an identical dirty tree gets an identical key.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::key::IdempotencyKey;

/// What to do with a dirty working tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GitKeyMode {
    /// A key only for a clean tree: HEAD's SHA.
    #[default]
    CleanOnly,
    /// For a dirty tree too: `dirty-` and 40 hex digits of SHA-256 over HEAD, the diff against
    /// it, and the untracked files' names and contents.
    HashDirty,
}

/// Why there is no key from git.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoGitKey {
    /// The tree has changes (modified, staged or untracked files).
    #[error(
        "the working tree has {changes} uncommitted change(s), so it is not a commit; commit them, or hash the changes into the key"
    )]
    Dirty {
        /// How many paths `git status` lists.
        changes: usize,
    },
    /// The directory is not inside a git repository.
    #[error("the directory is not inside a git repository")]
    NotARepository,
    /// The repository has no commit yet.
    #[error("the repository has no commits")]
    NoCommits,
    /// `git` could not be run.
    #[error("git could not be run: {0}")]
    GitUnavailable(String),
}

/// The key for the working tree at `dir`, or why there is none.
///
/// Runs `git` (`rev-parse`, `status`, and for [`GitKeyMode::HashDirty`] `diff` and `ls-files`).
///
/// ```no_run
/// use idempotent_retry::operation::{GitKeyMode, key_from_git};
///
/// match key_from_git(".".as_ref(), GitKeyMode::CleanOnly) {
///     Ok(key) => println!("deploying with key {key}"),
///     Err(why) => eprintln!("no idempotency key: {why}"),
/// }
/// ```
///
/// # Errors
///
/// [`NoGitKey`] says why there is no key.
pub fn key_from_git(dir: &Path, mode: GitKeyMode) -> Result<IdempotencyKey, NoGitKey> {
    let head = git(dir, &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])?;
    if !head.status.success() {
        let inside = git(dir, &["rev-parse", "--is-inside-work-tree"])?;
        return Err(if inside.status.success() { NoGitKey::NoCommits } else { NoGitKey::NotARepository });
    }
    let sha = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    let status = git(dir, &["status", "--porcelain=v1", "-z", "--untracked-files=all"])?;
    let changes = status.stdout.split(|b| *b == 0).filter(|entry| !entry.is_empty()).count();
    if changes == 0 {
        return IdempotencyKey::new(sha).map_err(|e| NoGitKey::GitUnavailable(format!("unexpected HEAD: {e}")));
    }
    if mode == GitKeyMode::CleanOnly {
        return Err(NoGitKey::Dirty { changes });
    }
    let mut hash = Sha256::new();
    hash.update(sha.as_bytes());
    hash.update(git_ok(dir, &["diff", "HEAD", "--binary"])?);
    let untracked = git_ok(dir, &["ls-files", "--others", "--exclude-standard", "-z"])?;
    let mut paths: Vec<&[u8]> = untracked.split(|b| *b == 0).filter(|p| !p.is_empty()).collect();
    paths.sort_unstable();
    for path in paths {
        hash.update(path);
        hash.update([0]);
        let file = dir.join(String::from_utf8_lossy(path).as_ref());
        hash.update(std::fs::read(&file).unwrap_or_default());
        hash.update([0]);
    }
    let hex: String = hash.finalize().iter().take(20).map(|b| format!("{b:02x}")).collect();
    Ok(IdempotencyKey::new(format!("dirty-{hex}")).expect("hex is a valid key"))
}

fn git(dir: &Path, args: &[&str]) -> Result<Output, NoGitKey> {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .map_err(|e| NoGitKey::GitUnavailable(e.to_string()))
}

fn git_ok(dir: &Path, args: &[&str]) -> Result<Vec<u8>, NoGitKey> {
    let out = git(dir, args)?;
    if !out.status.success() {
        return Err(NoGitKey::GitUnavailable(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_git_key_is_an_error_that_says_why() {
        let error: Box<dyn std::error::Error + Send + Sync> = Box::new(NoGitKey::Dirty { changes: 2 });
        assert!(error.to_string().starts_with("the working tree has 2 uncommitted change(s)"), "{error}");
    }
}
