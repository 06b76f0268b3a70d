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
            let unavailable = |why: String| FamError::Device(name.to_string(), why);
            cuda_libraries().map_err(unavailable)?;
            // The libraries are there; a driver without a GPU, or a GPU the kernels were not
            // built for, is an error from CUDA itself. A panic inside the CUDA bindings (a
            // symbol the installed driver lacks) is caught and reported the same way.
            match std::panic::catch_unwind(|| Device::new_cuda(n)) {
                Ok(Ok(d)) => Ok(d),
                Ok(Err(e)) => Err(unavailable(format!("CUDA reports: {e}"))),
                Err(p) => Err(unavailable(format!(
                    "the CUDA bindings failed: {}",
                    p.downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)")
                ))),
            }
        }
    }
}

/// The shared libraries candle's CUDA backend loads when it opens a device, each with the
/// file names tried (those of the CUDA bindings: unversioned, then by major version).
pub const CUDA_LIBRARIES: [(&str, &str); 5] = [
    ("cuda", "the NVIDIA driver"),
    ("nvrtc", "NVRTC"),
    ("cublas", "cuBLAS"),
    ("cublasLt", "cuBLASLt"),
    ("curand", "cuRAND"),
];

fn library_candidates(lib: &str) -> Vec<String> {
    let mut names = vec![format!("lib{lib}.so")];
    names.extend(["13", "12", "11", "10", "1"].map(|v| format!("lib{lib}.so.{v}")));
    names
}

/// Checks that the CUDA libraries can be loaded, before candle's CUDA backend (which loads
/// them at run time in a build from `scripts/build-cuda.sh`) would panic on a missing one.
/// The error names the library, the files tried, and what to do.
pub fn cuda_libraries() -> std::result::Result<(), String> {
    for (lib, what) in CUDA_LIBRARIES {
        let names = library_candidates(lib);
        // SAFETY: loading a CUDA library runs only its initialisers, as the bindings would.
        let found = names
            .iter()
            .any(|n| unsafe { libloading::Library::new(n) }.is_ok());
        if !found {
            let hint = if lib == "cuda" {
                "there is no NVIDIA driver on this machine; run with `--device cpu`"
            } else {
                "install it (PyTorch's CUDA wheels carry it) and add its folder to LD_LIBRARY_PATH, or run with `--device cpu`"
            };
            return Err(format!(
                "cannot load {what} (tried {}): {hint}",
                names.join(", ")
            ));
        }
    }
    Ok(())
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
            // On a machine without the driver, opening CUDA is an error naming the library.
            if cuda_libraries().is_err() {
                let e = open_device("cuda").unwrap_err().to_string();
                assert!(
                    e.contains("device `cuda` is not available: cannot load the NVIDIA driver (tried libcuda.so"),
                    "{e}"
                );
            }
        } else {
            assert!(parse_device_name("cuda")
                .unwrap_err()
                .contains("no CUDA support"));
        }
    }
}
