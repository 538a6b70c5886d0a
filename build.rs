//! With the `cuda` feature, compiles tuneforge's own CUDA kernels (`src/kernels`)
//! to PTX with nvcc, as candle does its own; without it, does nothing.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        println!("cargo::rerun-if-changed=src/kernels");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("ptx.rs");
        cudaforge::KernelBuilder::new()
            .source_dir("src/kernels")
            .arg("-O3")
            .build_ptx()?
            .write(out)?;
    }
    Ok(())
}
