//! A native node's identity seed kept in a file as 64 hex digits (mode 0600): the relay's
//! `relay.key`, a volunteer's `worker.key`.

use std::io;
use std::path::Path;

use swarmtrain_shared::crypto::{seed_from_hex, seed_to_hex};
use zeroize::Zeroizing;

/// Loads the seed kept in `path`, creating the file (and its folder) with a fresh random seed
/// if it is missing.
pub fn load_or_create(path: &Path) -> io::Result<Zeroizing<[u8; 32]>> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    match std::fs::read_to_string(path).map(Zeroizing::new) {
        Ok(hex) => seed_from_hex(&hex).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a 32-byte hex key", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| context("creating the folder of", e))?;
            }
            let seed = random_seed()?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| context("creating", e))?;
            io::Write::write_all(&mut file, seed_to_hex(&seed).as_bytes())
                .map_err(|e| context("writing", e))?;
            Ok(seed)
        }
        Err(e) => Err(context("reading", e)),
    }
}

/// 32 bytes from the operating system's random source.
pub fn random_seed() -> io::Result<Zeroizing<[u8; 32]>> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice())
        .map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_key_file_is_created_once_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("swarmtrain-keyfile-{}", std::process::id()));
        let path = dir.join("sub").join("node.key");
        let made = super::load_or_create(&path).expect("created");
        let again = super::load_or_create(&path).expect("read");
        assert_eq!(*made, *again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").expect("write");
        assert!(super::load_or_create(&path).is_err());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
