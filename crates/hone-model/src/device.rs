//! Run-time backend choice: `cpu` (burn's Flex backend) or `cuda[:N]` (burn-cuda, compiled in
//! with the `cuda` cargo feature). Code that runs a model implements [`BackendTask`] once,
//! generically over the backend, and [`run_on`] instantiates it for the chosen device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[cfg(not(feature = "cuda"))]
use crate::error::ModelError;
use crate::error::Result;
use crate::kernels::KernelBackend;

/// A device named on the command line or in a config: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[derive(Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| format!("invalid device `{s}`: expected cuda:N with N a number")),
                None => Err(format!(
                    "invalid device `{s}`: expected cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Work that runs on any backend.
pub trait BackendTask {
    type Output;
    /// Runs the work on backend `B`, device `device`.
    fn run<B: KernelBackend>(self, device: B::Device) -> Self::Output;
}

/// Whether this build can run on CUDA devices.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// Runs `task` on the backend of `spec`. A CUDA device in a build without the `cuda` feature is
/// an error that says how to get one.
pub fn run_on<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    match spec {
        DeviceSpec::Cpu => Ok(task.run::<crate::Cpu>(Default::default())),
        DeviceSpec::Cuda(index) => run_cuda(index, task),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<T: BackendTask>(index: usize, task: T) -> Result<T::Output> {
    let device = burn::backend::cuda::CudaDevice::new(index);
    Ok(task.run::<burn::backend::Cuda>(device))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(index: usize, _task: T) -> Result<T::Output> {
    Err(ModelError::Input(format!(
        "device cuda:{index} requested, but this hone was built without CUDA support; \
         rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit), or use --device cpu"
    )))
}
