//! The device of the wgpu reference tests (hone-model's `wgpu_reference.rs`, hone-train's
//! `wgpu_reference.rs`): burn's default wgpu device, set up on Vulkan once per test binary, with
//! the adapter it got written to stderr. CI pins Mesa's lavapipe (a Vulkan driver that runs on
//! the CPU) with `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` and `VK_ICD_FILENAMES` (see `.ci/run`).

#![allow(dead_code)]

use std::sync::OnceLock;

use burn::backend::wgpu::graphics::Vulkan;
use burn::backend::wgpu::{init_setup, RuntimeOptions, WgpuDevice};

/// burn's wgpu backend: f32 floats, i32 ints, u32 bools, kernels compiled to WGSL.
pub type Wgpu = burn::backend::Wgpu;

/// The default wgpu device, set up on Vulkan (the first call panics, naming what to install,
/// when there is no Vulkan adapter).
pub fn device() -> WgpuDevice {
    static ADAPTER: OnceLock<String> = OnceLock::new();
    ADAPTER.get_or_init(|| {
        let setup = std::panic::catch_unwind(|| {
            init_setup::<Vulkan>(&WgpuDevice::DefaultDevice, RuntimeOptions::default())
        })
        .unwrap_or_else(|_| {
            panic!(
                "no Vulkan adapter for burn's wgpu backend: install Mesa's lavapipe \
                 (Debian: `apt-get install mesa-vulkan-drivers libvulkan1`) or run .ci/run"
            )
        });
        let info = setup.adapter.get_info();
        let name = format!(
            "{} ({:?}, {:?}, {} {})",
            info.name, info.device_type, info.backend, info.driver, info.driver_info
        );
        eprintln!("wgpu adapter: {name}");
        name
    });
    WgpuDevice::DefaultDevice
}

/// The largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
