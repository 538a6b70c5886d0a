//! Running the example binaries that `cargo test` builds beside this test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;

/// What a finished run printed.
pub struct Run {
    pub stdout: String,
    pub stderr: String,
}

/// `target/<profile>/examples/<name>`, built by `cargo build --examples` with
/// this test's profile and features, once per test run: `cargo test` builds the
/// examples too, but `cargo test --test examples` alone would leave them stale.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "--examples"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        for (on, feature) in [
            (cfg!(feature = "cuda"), "cuda"),
            (cfg!(feature = "metal"), "metal"),
        ] {
            if on {
                build.args(["--features", feature]);
            }
        }
        let status = build.status().expect("running cargo build --examples");
        assert!(status.success(), "cargo build --examples failed");
    });
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The example as a command, run from a scratch folder so that nothing lands in
/// the checkout by accident.
pub fn command(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(binary(name));
    c.args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null());
    c
}

fn finish(name: &str, args: &[&str], out: std::process::Output, want_success: bool) -> Run {
    let run = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(
        out.status.success(),
        want_success,
        "{name} {} {}:\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        if want_success { "failed" } else { "succeeded" },
        run.stdout,
        run.stderr
    );
    run
}

/// Runs an example that must succeed.
pub fn ok(name: &str, args: &[&str]) -> Run {
    let out = command(name, args).output().expect("starting the example");
    finish(name, args, out, true)
}

/// Runs an example that must fail; its error output.
pub fn fails(name: &str, args: &[&str]) -> String {
    let out = command(name, args).output().expect("starting the example");
    finish(name, args, out, false).stderr
}

/// Starts an example in the background, its output captured.
pub fn spawn(name: &str, args: &[&str]) -> Child {
    command(name, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the example")
}

/// Waits for a spawned example that must succeed.
pub fn wait_ok(name: &str, args: &[&str], child: Child) -> Run {
    let out = child.wait_with_output().expect("waiting for the example");
    finish(name, args, out, true)
}

/// Text with its whitespace runs folded to single spaces, as `finetune` shows answers.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Sends `signal` to a running child.
pub fn signal(child: &Child, signal: i32) {
    let r = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(r, 0, "kill failed");
}

/// `--flag value` pairs from `base`, except the flags `extra` gives, then `extra`.
pub fn with_overrides<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let given: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|a| a.starts_with("--"))
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < base.len() {
        let takes_value = i + 1 < base.len() && !base[i + 1].starts_with("--");
        let width = if takes_value { 2 } else { 1 };
        if !given.contains(&base[i]) {
            out.extend_from_slice(&base[i..i + width]);
        }
        i += width;
    }
    out.extend_from_slice(extra);
    out
}
