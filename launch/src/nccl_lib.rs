//! Finding NCCL's library for CUDA workers, before they start.
//!
//! cudarc 0.19 (dynamic loading) opens NCCL under the names `libnccl.so`, `libnccl.so.13`,
//! `.12`, ... (`get_lib_name_candidates`), never `libnccl.so.2`: the only name NCCL's runtime
//! packages install (Debian/Ubuntu's libnccl2, the PyPI wheels nvidia-nccl-cu12/cu13); the
//! `libnccl.so` link comes with the development package alone. The launcher therefore finds
//! `libnccl.so.2` and gives its workers a directory holding a `libnccl.so` link to it, first on
//! their `LD_LIBRARY_PATH` (which the dynamic loader reads when a process starts, so it is set
//! for the workers, not in-process).

use std::path::{Path, PathBuf};

/// The names NCCL's library goes by, the one cudarc opens first.
const NAMES: [&str; 2] = ["libnccl.so", "libnccl.so.2"];

/// Where NCCL's library is: `TEMPER_NCCL_LIB`, then `LD_LIBRARY_PATH`, the Python
/// environments' `nvidia/nccl/lib` (a virtualenv, conda, the user's and the system's
/// site-packages), then the system's library directories. `var` reads the environment.
pub fn find(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = var("TEMPER_NCCL_LIB") {
        return Some(PathBuf::from(path));
    }
    search_dirs(&var)
        .into_iter()
        .find_map(|dir| NAMES.iter().map(|n| dir.join(n)).find(|p| p.is_file()))
}

fn search_dirs(var: &impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = var("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|k| var(k).map(PathBuf::from))
        .collect();
    if let Some(home) = var("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else {
                continue;
            };
            let mut pythons: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path())
                .collect();
            pythons.sort();
            for python in pythons.into_iter().rev() {
                for packages in ["site-packages", "dist-packages"] {
                    dirs.push(python.join(packages).join("nvidia/nccl/lib"));
                }
            }
        }
    }
    dirs.push("/usr/lib/python3/dist-packages/nvidia/nccl/lib".into());
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/local/cuda/lib64",
            "/usr/local/lib",
            "/usr/lib64",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    dirs
}

/// A directory under `cache` holding `libnccl.so`, a link to `library`: the directory to put
/// first on the workers' `LD_LIBRARY_PATH`.
pub fn link_dir(library: &Path, cache: &Path) -> std::io::Result<PathBuf> {
    let library = library.canonicalize()?;
    // One directory per library, so jobs with different NCCLs do not race on one link.
    let name: u64 = library
        .to_string_lossy()
        .bytes()
        .fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let dir = cache.join(format!("nccl-{name:016x}"));
    std::fs::create_dir_all(&dir)?;
    let link = dir.join(NAMES[0]);
    if std::fs::read_link(&link).ok().as_deref() != Some(library.as_path()) {
        let fresh = dir.join(format!(".{}.{}", NAMES[0], std::process::id()));
        let _ = std::fs::remove_file(&fresh);
        std::os::unix::fs::symlink(&library, &fresh)?;
        std::fs::rename(&fresh, &link)?;
    }
    Ok(dir)
}

/// `dir` first, then the current `LD_LIBRARY_PATH`'s entries.
pub fn library_path(dir: &Path, current: Option<String>) -> String {
    match current.filter(|c| !c.is_empty()) {
        Some(c) => format!("{}:{c}", dir.display()),
        None => dir.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("temper-nccl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_the_wheel_in_a_virtualenv_and_links_it() {
        let root = temp("venv");
        let wheel = root.join("venv/lib/python3.12/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&wheel).unwrap();
        std::fs::write(wheel.join("libnccl.so.2"), b"not really").unwrap();
        let vars: HashMap<&str, String> = [("VIRTUAL_ENV", root.join("venv").display().to_string())].into();
        let found = find(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(found, wheel.join("libnccl.so.2"));

        let dir = link_dir(&found, &root.join("cache")).unwrap();
        assert_eq!(std::fs::read(dir.join("libnccl.so")).unwrap(), b"not really");
        // Again: the same directory, the link kept.
        assert_eq!(link_dir(&found, &root.join("cache")).unwrap(), dir);
        assert_eq!(
            library_path(&dir, Some("/a:/b".into())),
            format!("{}:/a:/b", dir.display())
        );
        assert_eq!(library_path(&dir, Some(String::new())), dir.display().to_string());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_variable_and_ld_library_path_come_first() {
        let root = temp("order");
        std::fs::write(root.join("libnccl.so"), b"").unwrap();
        let vars: HashMap<&str, String> = [("LD_LIBRARY_PATH", format!("/nonexistent:{}", root.display()))].into();
        assert_eq!(find(|k| vars.get(k).cloned()), Some(root.join("libnccl.so")));
        let vars: HashMap<&str, String> = [("TEMPER_NCCL_LIB", "/x/libnccl.so.2".to_string())].into();
        assert_eq!(find(|k| vars.get(k).cloned()), Some(PathBuf::from("/x/libnccl.so.2")));
        std::fs::remove_dir_all(&root).unwrap();
        // A missing library through the variable is the launcher's error to report.
        assert!(link_dir(Path::new("/x/libnccl.so.2"), &std::env::temp_dir()).is_err());
    }
}
