//! Reading a training corpus from disk: one UTF-8 text file, or every text file in a folder.

use std::path::{Path, PathBuf};

/// Where the default run's corpus comes from: the fortune cookies that Debian's `fortunes`
/// package installs (about 2.5 MB of English text). `cargo xtask` installs the package.
pub const DEFAULT_CORPUS: &str = "/usr/share/games/fortunes";

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error(
        "cannot read corpus {path}: {source} (the default corpus comes from Debian's `fortunes` package: `apt-get install fortunes`, or pass --corpus)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corpus file {path} is not UTF-8 text (invalid byte at offset {offset})")]
    NotText { path: PathBuf, offset: usize },
    #[error("corpus folder {0} holds no UTF-8 text file")]
    Empty(PathBuf),
}

/// What was read: the concatenated text and the files it came from.
#[derive(Debug)]
pub struct Corpus {
    pub text: Vec<u8>,
    pub files: Vec<PathBuf>,
    /// Files in a folder that were passed over because they are not text (index files, …).
    pub skipped: Vec<PathBuf>,
}

fn is_text(bytes: &[u8]) -> Result<(), usize> {
    match std::str::from_utf8(bytes) {
        Ok(_) if bytes.contains(&0) => Err(bytes.iter().position(|b| *b == 0).unwrap_or(0)),
        Ok(_) => Ok(()),
        Err(e) => Err(e.valid_up_to()),
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `path`. A file must be UTF-8 text. In a folder, every regular file (not symlinks,
/// recursively, in name order) that is UTF-8 text without NUL bytes is used and the others are
/// listed in [`Corpus::skipped`]; files are joined with a blank line.
pub fn load(path: &Path) -> Result<Corpus, CorpusError> {
    let meta = std::fs::metadata(path).map_err(read_err(path))?;
    if meta.is_file() {
        let text = std::fs::read(path).map_err(read_err(path))?;
        is_text(&text).map_err(|offset| CorpusError::NotText {
            path: path.to_path_buf(),
            offset,
        })?;
        return Ok(Corpus {
            text,
            files: vec![path.to_path_buf()],
            skipped: Vec::new(),
        });
    }
    let mut pending = vec![path.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
            let entry = entry.map_err(read_err(&dir))?;
            let kind = entry.file_type().map_err(read_err(&entry.path()))?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                paths.push(entry.path());
            }
        }
    }
    paths.sort();
    let (mut text, mut files, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for file in paths {
        let bytes = std::fs::read(&file).map_err(read_err(&file))?;
        if is_text(&bytes).is_err() {
            skipped.push(file);
            continue;
        }
        if !text.is_empty() {
            text.extend_from_slice(b"\n\n");
        }
        text.extend_from_slice(&bytes);
        files.push(file);
    }
    if files.is_empty() {
        return Err(CorpusError::Empty(path.to_path_buf()));
    }
    Ok(Corpus {
        text,
        files,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_folders_and_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.txt"), "second file\n").expect("write");
        std::fs::write(dir.path().join("a.txt"), "first file\n").expect("write");
        std::fs::write(dir.path().join("a.dat"), [0u8, 1, 2, 0xff]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/c.txt"), "third\n").expect("write");

        let corpus = load(dir.path()).expect("folder");
        assert_eq!(corpus.text, b"first file\n\n\nsecond file\n\n\nthird\n");
        assert_eq!(corpus.files.len(), 3);
        assert_eq!(corpus.skipped, vec![dir.path().join("a.dat")]);

        assert_eq!(
            load(&dir.path().join("a.txt")).expect("file").text,
            b"first file\n"
        );
        assert!(matches!(
            load(&dir.path().join("a.dat")),
            Err(CorpusError::NotText { offset: 3, .. })
        ));
        let missing = load(&dir.path().join("missing")).unwrap_err();
        assert!(
            missing.to_string().contains("missing") && missing.to_string().contains("fortunes"),
            "{missing}"
        );
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load(empty.path()), Err(CorpusError::Empty(_))));
    }
}
