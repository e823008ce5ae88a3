//! Run-time backend choice: `cpu` (burn's Flex backend) or `cuda[:N]` (burn-cuda, compiled in
//! with the `cuda` cargo feature). Code that runs a model implements [`BackendTask`] once,
//! generically over the backend, and [`run_on`] instantiates it for the chosen device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
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
///
/// On the CPU the task runs on a thread of rayon's pool (the calling thread waits): the host
/// kernels' parallel loops then start from a worker, which shares its work with the others
/// through their queues, instead of from an outside thread, which hands every loop to the pool
/// and sleeps on a lock until it is done (a futex wake-up per loop: about a third of a
/// decoding step's time on SmolLM2-135M).
pub fn run_on<T: BackendTask + Send>(spec: DeviceSpec, task: T) -> Result<T::Output>
where
    T::Output: Send,
{
    match spec {
        DeviceSpec::Cpu => Ok(in_pool(move || task.run::<crate::Cpu>(Default::default()))),
        DeviceSpec::Cuda(index) => run_cuda(index, task),
    }
}

/// Runs `f` on a thread of rayon's global pool (directly when already on one).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(move |_| f())
    }
}

/// [`in_pool`], with the pool's other threads kept polling for work while `f` runs, instead
/// of going to sleep between two parallel loops and being woken for the next one. A decoding
/// step is a few hundred short parallel loops (one per projection and attention) with serial
/// work between them (norms, RoPE, sampling): a worker that falls asleep in such a gap costs a
/// futex wake-up and a context switch to bring back, about a tenth of the step on
/// SmolLM2-135M. The price is that those threads use their cores for the whole of `f`, so this
/// wraps computations (a generation, a serving step), not waits.
pub fn in_busy_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    in_pool(move || {
        let threads = rayon::current_num_threads();
        if threads < 2 {
            return f();
        }
        let caller = rayon::current_thread_index();
        let done = AtomicBool::new(false);
        /// Ends the polling when `f` returns or unwinds (the scope waits for the pollers, so a
        /// panic in `f` would otherwise never reach the caller).
        struct Finish<'a>(&'a AtomicBool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        rayon::scope(|s| {
            for _ in 1..threads {
                s.spawn(|_| {
                    // The caller runs a poller it did not hand out itself only once `f` waits
                    // for stolen work: it returns at once, so that the caller goes on.
                    if rayon::current_thread_index() == caller {
                        return;
                    }
                    while !done.load(Ordering::Acquire) {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
            let _finish = Finish(&done);
            f()
        })
    })
}

/// [`run_on`] on the calling thread, for a task that waits for outside events between its
/// computations (a server's worker: parked on a pool thread it would hold that thread while
/// idle, and several servers in one process could hold them all). Such a task moves each
/// computation onto the pool itself ([`in_pool`]).
pub fn run_on_this_thread<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output> {
    match spec {
        DeviceSpec::Cpu => Ok(task.run::<crate::Cpu>(Default::default())),
        DeviceSpec::Cuda(index) => run_cuda(index, task),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<T: BackendTask>(index: usize, task: T) -> Result<T::Output> {
    cuda_probe::check(index).map_err(ModelError::Input)?;
    let device = burn::backend::cuda::CudaDevice::new(index);
    Ok(task.run::<burn::backend::Cuda>(device))
}

/// burn-cuda loads the CUDA driver and NVRTC itself and panics (in its device thread, then in
/// the caller) when either is missing or the driver refuses to start; this probe asks the same
/// libraries first, so that the user gets an error saying what is missing and where to look.
#[cfg(feature = "cuda")]
mod cuda_probe {
    use libloading::{Library, Symbol};

    /// Names cudarc tries, most specific first.
    const DRIVER: &[&str] = &["libcuda.so.1", "libcuda.so"];
    const NVRTC: &[&str] = &[
        "libnvrtc.so",
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so.11",
    ];

    fn open(names: &[&str]) -> Option<Library> {
        // SAFETY: loading a system library runs its initialisers; these are NVIDIA's driver and
        // NVRTC, which burn-cuda loads the same way right after.
        names.iter().find_map(|n| unsafe { Library::new(*n) }.ok())
    }

    /// `cuGetErrorName` of `code`, or the number.
    fn error_name(lib: &Library, code: i32) -> String {
        type GetName = unsafe extern "C" fn(i32, *mut *const std::os::raw::c_char) -> i32;
        // SAFETY: the symbol has this signature in every CUDA driver API version; the returned
        // string is static in the driver.
        unsafe {
            let Ok(f) = lib.get::<GetName>(b"cuGetErrorName\0") else {
                return format!("error {code}");
            };
            let mut name = std::ptr::null();
            if f(code, &mut name) == 0 && !name.is_null() {
                std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned()
            } else {
                format!("error {code}")
            }
        }
    }

    /// Checks that the driver loads and starts, that device `index` exists, and that NVRTC
    /// loads.
    pub fn check(index: usize) -> Result<(), String> {
        let driver = open(DRIVER).ok_or_else(|| {
            "the NVIDIA driver library (libcuda.so.1) cannot be loaded: is an NVIDIA GPU and its \
             driver installed? (containers need it mounted; add its folder to LD_LIBRARY_PATH)"
                .to_string()
        })?;
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Count = unsafe extern "C" fn(*mut i32) -> i32;
        // SAFETY: cuInit(flags) and cuDeviceGetCount(int*) have these signatures in every CUDA
        // driver API version.
        let (init, count): (Symbol<Init>, Symbol<Count>) = unsafe {
            (
                driver
                    .get(b"cuInit\0")
                    .map_err(|e| format!("libcuda: {e}"))?,
                driver
                    .get(b"cuDeviceGetCount\0")
                    .map_err(|e| format!("libcuda: {e}"))?,
            )
        };
        let code = unsafe { init(0) };
        if code != 0 {
            let name = error_name(&driver, code);
            let hint = if name == "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH" {
                ": a libcuda.so from the CUDA toolkit (its `compat` or `stubs` folder) is found \
                 before the driver's own; put the driver's folder first in LD_LIBRARY_PATH"
            } else {
                ""
            };
            return Err(format!(
                "the CUDA driver did not start (cuInit: {name}){hint}"
            ));
        }
        let mut devices = 0i32;
        let code = unsafe { count(&mut devices) };
        if code != 0 {
            return Err(format!(
                "cannot count CUDA devices (cuDeviceGetCount: {})",
                error_name(&driver, code)
            ));
        }
        if index >= devices.max(0) as usize {
            return Err(format!(
                "device cuda:{index} requested, but the driver sees {devices} CUDA device(s)"
            ));
        }
        if open(NVRTC).is_none() {
            return Err(
                "NVRTC (libnvrtc.so, CUDA's run-time compiler, which burn-cuda compiles its \
                 kernels with) cannot be loaded: install the CUDA toolkit or the nvidia-cuda-nvrtc \
                 package and add the folder holding libnvrtc.so to LD_LIBRARY_PATH"
                    .to_string(),
            );
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<T: BackendTask>(index: usize, _task: T) -> Result<T::Output> {
    Err(ModelError::Input(format!(
        "device cuda:{index} requested, but this hone was built without CUDA support; \
         rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit), or use --device cpu"
    )))
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::in_busy_pool;

    #[test]
    fn a_busy_pool_runs_parallel_work_and_returns_its_value() {
        let sum = in_busy_pool(|| {
            (0..100u64)
                .map(|_| (0..10_000u64).into_par_iter().sum::<u64>())
                .sum::<u64>()
        });
        assert_eq!(sum, 100 * (10_000 * 9_999 / 2));
    }

    #[test]
    fn a_panic_inside_a_busy_pool_reaches_the_caller() {
        // Without the pollers being told to stop on unwinding, the scope would wait for them
        // forever and this call would never return.
        let caught = std::panic::catch_unwind(|| {
            in_busy_pool(|| {
                let _: u64 = (0..1_000u64).into_par_iter().sum();
                panic!("inside the pool")
            })
        });
        assert!(caught.is_err());
    }
}
