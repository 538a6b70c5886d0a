//! Choosing where to run: `cpu`, `cuda`, `cuda:N`, `metal` or `auto`, and the
//! matching compute dtype (f32 on CPU; bf16 on CUDA and Metal).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::str::FromStr;

/// A device request, as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// The N-th CUDA GPU.
    Cuda(usize),
    /// The Apple GPU.
    Metal,
    /// A GPU when one is present and compiled in, else the CPU.
    #[default]
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Self::Cpu,
            "cuda" | "gpu" => Self::Cuda(0),
            "metal" | "mps" => Self::Metal,
            "auto" => Self::Auto,
            other => match other.strip_prefix("cuda:") {
                Some(n) => Self::Cuda(
                    n.parse()
                        .with_context(|| format!("bad CUDA ordinal in '{s}'"))?,
                ),
                None => bail!("unknown device '{s}': use cpu, cuda, cuda:N, metal or auto"),
            },
        })
    }
}

/// Writes the request as [`FromStr`] reads it back: `cpu`, `cuda:N`, `metal`, `auto`.
impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, with a clear error when it is not compiled in or not present.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!("--device cuda needs tuneforge built with `--features cuda`");
                }
                Device::new_cuda(n).with_context(|| {
                    format!("opening CUDA device {n}: is an NVIDIA GPU and driver present?")
                })
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    bail!("--device metal needs tuneforge built with `--features metal` on macOS");
                }
                Device::new_metal(0).context("opening the Metal device")
            }
            Self::Auto => Ok(find_gpu().unwrap_or(Device::Cpu)),
        }
    }
}

/// The first GPU, when tuneforge was built with `cuda` or `metal` and one is
/// present; else why not, in words.
pub fn find_gpu() -> std::result::Result<Device, String> {
    if !cfg!(any(feature = "cuda", feature = "metal")) {
        return Err("tuneforge was built without `--features cuda` or `--features metal`".into());
    }
    if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
        return Device::new_cuda(0).map_err(|e| format!("opening CUDA device 0: {e}"));
    }
    if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
        return Device::new_metal(0).map_err(|e| format!("opening the Metal device: {e}"));
    }
    Err("no CUDA or Metal device is present".into())
}

/// The first GPU, for a check that needs one; else `None`, after saying why the
/// check is skipped on stderr, written past the test harness's capture so that
/// a plain `cargo test` shows it.
pub fn gpu_or_say_why() -> Option<Device> {
    match find_gpu() {
        Ok(gpu) => Some(gpu),
        Err(why) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "GPU checks skipped: {why}");
            None
        }
    }
}

/// The default compute dtype for a device: f32 on CPU, bf16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        for spec in [
            DeviceSpec::Cpu,
            DeviceSpec::Cuda(2),
            DeviceSpec::Metal,
            DeviceSpec::Auto,
        ] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert!("tpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .to_string()
            .contains("cuda:N"));
        assert!(DeviceSpec::Auto.open().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
