//! Files written whole or not at all: a temporary name beside the target, then a rename, so a
//! crash or a full disk never leaves a truncated file under the final name. Checkpoint
//! directories do the same at the directory level; final outputs (adapter, merged model,
//! model card, GGUF) use these.

use std::path::Path;

/// Writes `path` through a temporary file beside it (`.NAME.tmp`), renamed into place once
/// `write` has finished, so a crash or a full disk never leaves a truncated file under the
/// final name (a reader sees the old file or the new one). The temporary is removed on error.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of bytes already in memory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails half-way (a full disk) leaves the old file whole and no temporary.
    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = std::env::temp_dir().join(format!("temper-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("adapter_model.safetensors");
        write_file_atomic(&path, b"old, complete").unwrap();
        let err = write_atomic(&path, |tmp| {
            std::fs::write(tmp, b"new, trunc")?;
            Err(std::io::Error::other("No space left on device"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("No space left"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old, complete");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("adapter_model.safetensors")]);
        write_file_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
