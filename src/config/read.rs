//! Reading the files a config names, with bounds.
//!
//! Every file subguard reads from disk is named by an operator, and a slip of the pen in a config
//! edit reaches a running sidecar through hot reload. Two such slips used to take a sidecar down:
//! a path naming a device such as `/dev/zero` was read until memory ran out, and a named pipe
//! with no writer blocked the reloader for good. So files are read only up to a limit, and the
//! files a config names must be regular files; the config itself may be a pipe (`validate
//! --config <(...)`), but it is read up to a limit too.

use std::io::Read;
use std::path::Path;

/// Longest config file: a config with thousands of tenants is a few megabytes.
pub const CONFIG_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Longest CA bundle, header-value file or other small file a config names.
pub const SMALL_FILE_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Default `max_file_bytes` of a `kind: file` directory.
pub const USERS_FILE_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Why a file could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// Not a regular file: what it is instead.
    NotRegular(&'static str),
    /// Longer than the limit (the limit, in bytes).
    TooLarge(u64),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => f.write_str(&super::io_reason(e)),
            ReadError::NotRegular(what) => write!(f, "not a regular file but {what}"),
            ReadError::TooLarge(limit) => write!(f, "larger than the limit of {}", bytes(*limit)),
        }
    }
}

impl std::error::Error for ReadError {}

/// `n` bytes in the largest unit that holds it exactly: `256 MiB`, `1536 bytes`.
pub fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    match UNITS.iter().find(|(size, _)| n >= *size && n.is_multiple_of(*size)) {
        Some((size, unit)) => format!("{} {unit}", n / size),
        None => format!("{n} bytes"),
    }
}

/// What a file that is not a regular file is, for the error.
fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_socket() {
        "a socket"
    } else {
        "something else"
    }
}

/// Whether `path` (symbolic links followed) is a regular file. Checked before opening, since
/// opening a named pipe blocks until something writes to it.
pub fn regular(path: &Path) -> Result<std::fs::Metadata, ReadError> {
    let meta = std::fs::metadata(path).map_err(ReadError::Io)?;
    if meta.is_file() { Ok(meta) } else { Err(ReadError::NotRegular(kind_of(meta.file_type()))) }
}

/// Reads a regular file of at most `limit` bytes.
pub fn file(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let meta = regular(path)?;
    if meta.len() > limit {
        return Err(ReadError::TooLarge(limit));
    }
    let capacity = usize::try_from(meta.len()).unwrap_or(0);
    let opened = std::fs::File::open(path).map_err(ReadError::Io)?;
    read_up_to(opened, limit, capacity)
}

/// [`file`], as UTF-8 text.
pub fn text(path: &Path, limit: u64) -> Result<String, ReadError> {
    utf8(file(path, limit)?)
}

/// Reads at most `limit` bytes of UTF-8 from `path`, whatever it is (a regular file, a pipe,
/// `/dev/stdin`): for the config, which a shell may hand over as `<(...)`.
pub fn any_text(path: &Path, limit: u64) -> Result<String, ReadError> {
    reader_text(std::fs::File::open(path).map_err(ReadError::Io)?, limit)
}

/// At most `limit` bytes of UTF-8 from `reader` (standard input).
pub fn reader_text(reader: impl Read, limit: u64) -> Result<String, ReadError> {
    utf8(read_up_to(reader, limit, 0)?)
}

fn read_up_to(reader: impl Read, limit: u64, capacity: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::with_capacity(capacity);
    // One byte past the limit tells a file at the limit from a longer one (a file can also grow
    // between the look at its size and the read).
    reader.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(ReadError::Io)?;
    if out.len() as u64 > limit {
        return Err(ReadError::TooLarge(limit));
    }
    Ok(out)
}

fn utf8(raw: Vec<u8>) -> Result<String, ReadError> {
    String::from_utf8(raw).map_err(|e| {
        ReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_refused_before_it_is_read() {
        let e = file(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file but a character device");
        assert_eq!(
            text(Path::new("/tmp"), 1024).unwrap_err().to_string(),
            "not a regular file but a directory"
        );
    }

    #[test]
    fn a_named_pipe_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("users.yaml");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert_eq!(file(&fifo, 1024).unwrap_err().to_string(), "not a regular file but a named pipe");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_and_one_at_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users.yaml");
        std::fs::write(&f, vec![b'a'; 2048]).unwrap();
        assert_eq!(text(&f, 2048).unwrap().len(), 2048);
        assert_eq!(file(&f, 2047).unwrap_err().to_string(), "larger than the limit of 2047 bytes");
        // The config may be anything that can be read, but only up to its limit too.
        assert!(matches!(any_text(Path::new("/dev/zero"), 4096), Err(ReadError::TooLarge(4096))));
        assert_eq!(any_text(&f, 4096).unwrap().len(), 2048);
    }

    #[test]
    fn missing_and_binary_files_say_so() {
        assert_eq!(file(Path::new("/nonexistent/users.yaml"), 10).unwrap_err().to_string(), "no such file");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("users.yaml");
        std::fs::write(&f, b"acme:\n  - sub: \xff\n").unwrap();
        assert_eq!(text(&f, 100).unwrap_err().to_string(), "not UTF-8 text (byte 15)");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(256 * 1024 * 1024), "256 MiB");
        assert_eq!(bytes(1536), "1536 bytes");
        assert_eq!(bytes(2048), "2 KiB");
        assert_eq!(bytes(100), "100 bytes");
        assert_eq!(bytes(3 << 30), "3 GiB");
    }
}
