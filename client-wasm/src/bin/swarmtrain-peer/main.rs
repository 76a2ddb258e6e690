//! `swarmtrain-peer`: a native volunteer (the browser package's peer code, on ndarray), and the
//! load generators that drive a relay as many peers do (`loadtest`, `soak`).

#[cfg(not(target_arch = "wasm32"))]
mod loadtest;
#[cfg(not(target_arch = "wasm32"))]
mod native;
#[cfg(not(target_arch = "wasm32"))]
mod soak;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    native::main()
}

/// The browser has no command line: the package's entry points are `Trainer` and `runTrainer`.
#[cfg(target_arch = "wasm32")]
fn main() {}
