//! Git in a scratch repository, isolated from the user's configuration. Shared by the test
//! binaries that check keys from git (`tests/all`, `tests/cli.rs`).

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `git -C dir args…` with a throwaway identity and no global or system configuration.
pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

/// The SHA of HEAD in `dir`.
pub fn head(dir: &Path) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(["rev-parse", "HEAD"]).output().expect("git runs");
    String::from_utf8(out.stdout).expect("a SHA is ASCII").trim().to_owned()
}

/// Whether git can be run at all.
pub fn available() -> bool {
    Command::new("git").arg("--version").output().is_ok()
}
