//! Devices: `cpu`, `cuda`, `cuda:N`. CUDA needs a build with the `cuda` feature.

use fam_core::candle::Device;

use fam_core::error::{FamError, Result};

/// A device named in a pipeline or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

/// Parses a device name; the error says what is accepted and whether this build has CUDA.
pub fn parse_device_name(name: &str) -> std::result::Result<DeviceName, String> {
    let name = name.trim();
    let parsed = match name {
        "cpu" => DeviceName::Cpu,
        "cuda" | "gpu" => DeviceName::Cuda(0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => DeviceName::Cuda(n),
            _ => {
                return Err(format!(
                    "`{name}` is not a device (use \"cpu\", \"cuda\" or \"cuda:N\")"
                ))
            }
        },
    };
    if matches!(parsed, DeviceName::Cuda(_)) && !cfg!(feature = "cuda") {
        return Err(format!(
            "`{name}` asks for CUDA, but this build has no CUDA support; rebuild with `cargo build --release --features cuda`"
        ));
    }
    Ok(parsed)
}

/// Opens the named device.
pub fn open_device(name: &str) -> Result<Device> {
    match parse_device_name(name).map_err(FamError::invalid)? {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(n) => {
            Device::new_cuda(n).map_err(|e| FamError::Device(name.to_string(), e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_device_name("cpu"), Ok(DeviceName::Cpu));
        assert!(parse_device_name("tpu")
            .unwrap_err()
            .contains("not a device"));
        if cfg!(feature = "cuda") {
            assert_eq!(parse_device_name("cuda:1"), Ok(DeviceName::Cuda(1)));
        } else {
            assert!(parse_device_name("cuda")
                .unwrap_err()
                .contains("no CUDA support"));
        }
    }
}
