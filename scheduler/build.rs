//! Stamps the git revision into `krest --version` (`KREST_GIT_REVISION`): taken from the
//! environment when set (builds from a source archive, container builds), else from `git`,
//! else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KREST_GIT_REVISION");
    let from_env = std::env::var("KREST_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty());
    let revision = from_env.unwrap_or_else(|| {
        // Rebuild when HEAD moves (the git directory may be a file in a worktree).
        if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/refs/heads");
        }
        match git(&["rev-parse", "--short=12", "HEAD"]) {
            Some(rev) => {
                let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                    .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{rev}-dirty")
                } else {
                    rev
                }
            }
            None => "unknown".to_string(),
        }
    });
    println!("cargo:rustc-env=KREST_GIT_REVISION={revision}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
