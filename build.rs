//! Build facts for `portcullis_build_info`: the rustls version (from Cargo.lock, the exact
//! one built with `--locked`) and the source commit (`BUILD_COMMIT` when the builder sets
//! it, as an image build without `.git` can; else `git`; else "unknown"). Nothing here
//! touches the network.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=BUILD_COMMIT");
    let rustls = rustls_version(Path::new("Cargo.lock")).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_RUSTLS_VERSION={rustls}");
    let commit = std::env::var("BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_COMMIT={}", commit.trim());
}

/// The version of the `rustls` package in the lock file.
fn rustls_version(lock: &Path) -> Option<String> {
    let text = std::fs::read_to_string(lock).ok()?;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == r#"name = "rustls""# {
            let version = lines.next()?.trim().strip_prefix("version = ")?;
            return Some(version.trim_matches('"').to_string());
        }
    }
    None
}

/// The short hash of HEAD, and the files whose change means a new HEAD.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &reference]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    // A path that does not exist would make cargo run this script on every build.
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        if Path::new(&packed).exists() {
            println!("cargo:rerun-if-changed={packed}");
        }
    }
    Some(commit)
}
