//! The essays a run uploads: the generated essays shipped in `crates/huleedu/corpus/`
//! (common words with one-edit typos for the spellchecker to find), two of them invalid
//! (`essay_24_empty.txt`, `essay_25_too_short.txt`).

use std::path::Path;

use crate::error::{Error, Result};

/// The shipped corpus directory.
pub const CORPUS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus");

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusFile {
    /// File name.
    pub name: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The first `essays` files of `dir` in name order; when `essays` exceeds the directory,
/// its files are used again under numbered names (`essay_01_2.txt`, ...).
///
/// # Errors
/// [`Error::Corpus`] when the directory or a file cannot be read, or holds no files.
pub fn load(dir: &Path, essays: usize) -> Result<Vec<CorpusFile>> {
    let corpus_err = |source| Error::Corpus {
        path: dir.to_owned(),
        source,
    };
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(corpus_err)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(corpus_err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no files",
        )));
    }
    let mut files = Vec::with_capacity(essays);
    for i in 0..essays {
        let path = &paths[i % paths.len()];
        let bytes = std::fs::read(path).map_err(|source| Error::Corpus {
            path: path.clone(),
            source,
        })?;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let round = i / paths.len();
        let name = if round == 0 {
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        } else {
            format!("{stem}_{}.txt", round + 1)
        };
        files.push(CorpusFile { name, bytes });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_corpus_has_23_valid_and_2_invalid_essays() {
        use crate::file_service::{validate, Validation, ValidationRules};
        let files = load(Path::new(CORPUS_DIR), 25).unwrap();
        assert_eq!(files.len(), 25);
        let invalid: Vec<&str> = files
            .iter()
            .filter(|f| {
                !matches!(
                    validate(&f.bytes, ValidationRules::default()),
                    Validation::Valid(_)
                )
            })
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(invalid, ["essay_24_empty.txt", "essay_25_too_short.txt"]);
        let more = load(Path::new(CORPUS_DIR), 27).unwrap();
        assert_eq!(more[26].name, "essay_02_2.txt");
    }
}
