//! HTTPS downloads with a progress bar, a sha256 check and an atomic rename.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// An HTTP agent that fails fast when a host cannot be reached.
pub(crate) fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("tuneforge/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A byte-count progress bar for a transfer of `total` bytes (spinner if unknown).
pub(crate) fn progress_bar(total: Option<u64>, label: &str) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// Copies `reader` into `writer`, hashing with sha256 and advancing `bar`. Returns the hex digest.
pub(crate) fn copy_hashed(
    mut reader: impl Read,
    writer: &mut impl Write,
    bar: &ProgressBar,
) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    copy_hashed(file, &mut std::io::sink(), &ProgressBar::hidden())
        .with_context(|| format!("reading {}", path.display()))
}

/// Checks a computed digest against the expected one.
pub(crate) fn check_sha256(what: &str, got: &str, expected: &str) -> Result<()> {
    if !got.eq_ignore_ascii_case(expected) {
        bail!(
            "sha256 mismatch for {what}: expected {expected}, got {got}. The download is corrupt or \
             the mirror changed; nothing was kept. Try again, or check the sha256 in models.toml."
        );
    }
    Ok(())
}

/// Downloads `url` into a temporary file inside `dir`, checking its sha256 if given.
/// The caller persists or drops the returned file; a failed download leaves nothing behind.
pub(crate) fn download_to_temp(
    url: &str,
    dir: &Path,
    expected_sha256: Option<&str>,
    label: &str,
) -> Result<tempfile::NamedTempFile> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let response = agent()
        .get(url)
        .call()
        .with_context(|| format!("requesting {url}"))?;
    let total = response
        .header("Content-Length")
        .and_then(|v| v.parse::<u64>().ok());
    let bar = progress_bar(total, label);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let digest = {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        let digest = copy_hashed(response.into_reader(), &mut w, &bar)
            .with_context(|| format!("downloading {url}"))?;
        w.flush()
            .with_context(|| format!("writing the download of {url}"))?;
        digest
    };
    bar.finish_and_clear();
    if let Some(total) = total {
        let got = tmp.as_file().metadata()?.len();
        if got != total {
            bail!("download of {url} was cut short: {got} of {total} bytes");
        }
    }
    if let Some(expected) = expected_sha256 {
        check_sha256(url, &digest, expected)?;
    }
    Ok(tmp)
}
