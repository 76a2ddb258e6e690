//! Browser test suites for the client live in `tests/`; they run in headless Chromium through
//! `wasm-bindgen-test-runner` (`cargo xtask test`).
