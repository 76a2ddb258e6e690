//! Running commands: the workspace root, the target directory, cargo, and child processes whose
//! failure is an error naming the command.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;

/// The workspace root. `cargo run` sets CARGO_MANIFEST_DIR for the binary it starts, which is
/// right for this checkout even when the binary was built from another one sharing the
/// CARGO_TARGET_DIR (cargo does not rebuild xtask for a moved checkout, so the path compiled in
/// can name a clone that is gone).
pub(crate) fn root() -> PathBuf {
    let manifest = env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest
        .parent()
        .map_or_else(|| manifest.clone(), Path::to_path_buf)
}

pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    // What cargo set for this xtask process itself is not passed on: ring's build script reruns
    // when `CARGO_MANIFEST_DIR` or `CARGO_PKG_NAME` changes, and with it ring and every crate
    // above it (rustls, libp2p, webrtc, the workspace) were rebuilt whenever the checkout's path
    // changed (CI clones afresh) or cargo had run without the xtask in between.
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(set_for_the_xtask) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Whether `variable` is one cargo sets for the binary it runs (here the xtask), as opposed to
/// one it reads (`CARGO_TARGET_DIR`, `CARGO_HOME`, …).
fn set_for_the_xtask(variable: &str) -> bool {
    variable.starts_with("CARGO_PKG_")
        || matches!(
            variable,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
        )
}

pub(crate) fn status(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("could not start `{}`: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed with {status}", describe(cmd)))
    }
}

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Resident and peak memory of process `pid`, in kB, from /proc.
pub(crate) fn memory_kb(pid: u32) -> Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Writes `path.gz` (`gzip -9`) and `path.br` (brotli at quality 11, Node's zlib) beside
/// `path`, which the relay serves in its place to browsers that accept them (`ServeDir`'s
/// precompressed variants); returns their sizes in bytes, gzip then brotli.
pub(crate) fn precompress(path: &std::path::Path) -> Result<(u64, u64)> {
    let file = path.display().to_string();
    status(
        Command::new("gzip")
            .args(["-9", "-k", "-f", "-n"])
            .arg(path),
    )?;
    let script = "const z = require('zlib'), fs = require('fs'); const f = process.argv[1]; \
        const data = fs.readFileSync(f); \
        fs.writeFileSync(f + '.br', z.brotliCompressSync(data, { params: { \
          [z.constants.BROTLI_PARAM_QUALITY]: 11, [z.constants.BROTLI_PARAM_LGWIN]: 24, \
          [z.constants.BROTLI_PARAM_SIZE_HINT]: data.length } }));";
    status(Command::new("node").args(["-e", script, &file]))?;
    compressed_sizes(path)
}

/// The sizes of the `.gz` and `.br` copies [`precompress`] wrote beside `path`.
pub(crate) fn compressed_sizes(path: &std::path::Path) -> Result<(u64, u64)> {
    let size = |ext: &str| {
        let copy = format!("{}.{ext}", path.display());
        fs::metadata(&copy)
            .map(|m| m.len())
            .map_err(|e| format!("{copy}: {e} (run `cargo xtask build-wasm`)"))
    };
    Ok((size("gz")?, size("br")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_cargo_set_for_the_xtask_stays_behind_and_what_it_reads_goes_on() {
        for set in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
        ] {
            assert!(super::set_for_the_xtask(set), "{set}");
        }
        for read in [
            "CARGO_TARGET_DIR",
            "CARGO_HOME",
            "CARGO_TERM_COLOR",
            "CARGO",
        ] {
            assert!(!super::set_for_the_xtask(read), "{read}");
        }
    }
}
