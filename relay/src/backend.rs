//! Which backend runs the relay's aggregation, chosen at run time from those compiled in
//! (`ndarray` always; `wgpu` and `cuda` with the crate features of the same names). The CPU
//! default runs the shared fast kernels ([`step_cpu`], what `bench robust` times and what the
//! simulator and the attack grid run); the Burn backends run the same rules as tensor
//! operations ([`outer_step_with`](swarmtrain_shared::aggregate::outer_step_with)), bitwise equal for mean and median, to rounding for the
//! trimmed mean (the CPU kernel sums its kept values in selection-network order).

use std::fmt;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
use swarmtrain_shared::aggregate::outer_step_with;
use swarmtrain_shared::aggregate::{AggregateError, RoundInputs, Stepped, step_cpu};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationBackend {
    /// The CPU, always available: the shared multi-threaded kernels.
    #[default]
    Ndarray,
    /// wgpu: Vulkan, Metal or DX12 (build with `--features wgpu`).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// NVIDIA CUDA (build with `--features cuda`; needs the driver at run time).
    #[cfg(feature = "cuda")]
    Cuda,
}

impl fmt::Display for AggregationBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Ndarray => "ndarray",
            #[cfg(feature = "wgpu")]
            Self::Wgpu => "wgpu",
            #[cfg(feature = "cuda")]
            Self::Cuda => "cuda",
        };
        f.write_str(name)
    }
}

impl AggregationBackend {
    /// The backends compiled into this binary.
    pub fn compiled_in() -> Vec<Self> {
        <Self as clap::ValueEnum>::value_variants().to_vec()
    }

    /// Aggregates with the run's rule and applies the outer Nesterov step on this backend.
    pub async fn outer_step(self, inputs: &RoundInputs<'_>) -> Result<Stepped, AggregateError> {
        match self {
            Self::Ndarray => step_cpu(inputs),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => {
                let device = burn::backend::wgpu::WgpuDevice::default();
                outer_step_with::<burn::backend::Wgpu>(&device, inputs).await
            }
            #[cfg(feature = "cuda")]
            Self::Cuda => {
                let device = burn::backend::cuda::CudaDevice::default();
                outer_step_with::<burn::backend::Cuda>(&device, inputs).await
            }
        }
    }
}
