//! Reading one manifest file safely: only regular files (after following
//! symlinks), opened without ever blocking, and never more than a size
//! limit, so a FIFO, a device or a runaway file named `*.yaml` cannot stall
//! or exhaust the agent.
use std::{
    fs::{self, File},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Default `--max-manifest-size`: far above any real manifest (the API
/// server refuses requests over 3 MiB), far below what hurts the agent.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 8 << 20;

/// Why a file was skipped; the caller names the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error(
        "{0} is not a regular file; skipped (only regular files, or symlinks to them, are read)"
    )]
    NotRegular(&'static str),
    #[error(
        "{size} bytes is over the limit of {limit} bytes (--max-manifest-size); the file is skipped"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error(
        "grew past the limit of {limit} bytes (--max-manifest-size) while being read; the file is skipped"
    )]
    Grew { limit: u64 },
    #[error("not UTF-8 text: {0}")]
    NotUtf8(String),
    #[error("cannot read the file: {0}")]
    Io(String),
}

/// The file's text, if it is a regular file of at most `limit` bytes.
pub fn read_manifest(path: &Path, limit: u64) -> Result<String, ReadError> {
    // Follows symlinks (ConfigMap volumes are symlinks), and never opens.
    let meta = fs::metadata(path).map_err(|e| ReadError::Io(e.to_string()))?;
    check_type(&meta)?;
    // O_NONBLOCK: if the path was swapped for a FIFO since the check, the
    // open returns at once instead of waiting for a writer.
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ReadError::Io(e.to_string()))?;
    // What was opened is what counts.
    let meta = file.metadata().map_err(|e| ReadError::Io(e.to_string()))?;
    check_type(&meta)?;
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    // Bounded: a file that grows while it is read stops at limit + 1 bytes.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut file)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Io(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::Grew { limit });
    }
    String::from_utf8(bytes).map_err(|e| ReadError::NotUtf8(e.utf8_error().to_string()))
}

fn check_type(meta: &fs::Metadata) -> Result<(), ReadError> {
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(ReadError::NotRegular(what))
}

/// `--max-manifest-size`: bytes, with an optional `Ki`/`Mi`/`Gi` (or
/// `KiB`, `MiB`, `GiB`) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 8Mi or 524288"))?;
    let shift = match unit.trim_end_matches('B') {
        "" => 0,
        "Ki" | "K" => 10,
        "Mi" | "M" => 20,
        "Gi" | "G" => 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use Ki, Mi or Gi)")),
    };
    let size = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))?;
    if size == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::unix::fs::symlink};

    use super::*;

    #[test]
    fn reads_regular_files_and_symlinks_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, "kind: Service\n").unwrap();
        symlink(&file, dir.path().join("b.yaml")).unwrap();
        assert_eq!(read_manifest(&file, 100).unwrap(), "kind: Service\n");
        assert_eq!(
            read_manifest(&dir.path().join("b.yaml"), 100).unwrap(),
            "kind: Service\n"
        );
    }

    #[test]
    fn refuses_fifos_devices_and_directories_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f.yaml");
        nix_mkfifo(&fifo);
        // No writer: a plain open would block for ever.
        assert_eq!(
            read_manifest(&fifo, 100),
            Err(ReadError::NotRegular("a FIFO"))
        );
        let zero = dir.path().join("z.yaml");
        symlink("/dev/zero", &zero).unwrap();
        assert_eq!(
            read_manifest(&zero, 100),
            Err(ReadError::NotRegular("a character device"))
        );
        let sub = dir.path().join("d.yaml");
        fs::create_dir(&sub).unwrap();
        assert_eq!(
            read_manifest(&sub, 100),
            Err(ReadError::NotRegular("a directory"))
        );
    }

    #[test]
    fn refuses_files_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.yaml");
        fs::File::create(&file)
            .unwrap()
            .write_all(&[b'#'; 101])
            .unwrap();
        assert_eq!(
            read_manifest(&file, 100),
            Err(ReadError::TooLarge {
                size: 101,
                limit: 100
            })
        );
        assert_eq!(read_manifest(&file, 101).unwrap().len(), 101);
    }

    #[test]
    fn reads_no_more_than_the_limit_whatever_the_size_said() {
        // procfs reports size 0 for files that hold more: the same as a
        // file that grows between the size check and the read.
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("status.yaml");
        symlink("/proc/self/status", &status).unwrap();
        assert_eq!(
            read_manifest(&status, 16),
            Err(ReadError::Grew { limit: 16 })
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8Mi"), Ok(8 << 20));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("512Ki"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("8 parsecs").is_err());
        assert!(parse_size("99999999999Gi").is_err());
    }

    fn nix_mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    }
}
