//! Output files written through the page cache, or past it (`O_DIRECT`).
//!
//! A buffered write copies every byte into page-cache memory the kernel takes fresh. On a
//! virtual machine whose host takes free guest memory back (free page reporting), that
//! memory is faulted in again from the host on first touch, and a replay's output files
//! (hundreds of MB) spend most of the run in the kernel. Written directly, the bytes go
//! from the process's own buffers, reused from block to block, to the disk: on a fast
//! local disk that is a fraction of the time, on a slow one (a network volume) the
//! process waits for the device instead of leaving the writing to the kernel.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The alignment and granule of direct I/O: the largest logical block size disks have.
const BLOCK: usize = 4096;

/// Bytes gathered before a direct write goes out.
const BLOCKS_PER_WRITE: usize = 256;

/// One block of memory at the alignment direct I/O needs.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// A file being written, buffered or direct. [`finish`](OutFile::finish) it: a direct
/// file's last partial block goes out there, and the file is cut to what was written.
pub struct OutFile {
    file: File,
    /// Gathers whole blocks for direct writes; `None` when writing through the page cache.
    blocks: Option<Vec<Block>>,
    /// Bytes held in `blocks`.
    held: usize,
    /// Bytes of blocks written out: where the next direct write goes.
    flushed: u64,
    written: u64,
}

impl OutFile {
    /// Creates (or truncates) `path`. With `direct`, writes bypass the page cache where the
    /// file system allows it (not every one does: tmpfs on older kernels, some network
    /// file systems); elsewhere they go through it as usual.
    pub fn create(path: &Path, direct: bool) -> io::Result<OutFile> {
        let (file, blocks) = match direct.then(|| open_direct(path)).transpose()?.flatten() {
            Some(file) => (file, Some(vec![Block([0; BLOCK]); BLOCKS_PER_WRITE])),
            None => (File::create(path)?, None),
        };
        Ok(OutFile { file, blocks, held: 0, flushed: 0, written: 0 })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        if self.blocks.is_none() {
            return self.file.write_all(data);
        }
        while !data.is_empty() {
            let bytes = as_bytes_mut(self.blocks.as_mut().expect("checked above"));
            let n = data.len().min(bytes.len() - self.held);
            bytes[self.held..self.held + n].copy_from_slice(&data[..n]);
            self.held += n;
            data = &data[n..];
            if self.held == BLOCK * BLOCKS_PER_WRITE {
                self.write_held()?;
            }
        }
        Ok(())
    }

    /// Writes what is held and cuts the file to the bytes written (a direct file's last
    /// block is padded to write it, and a file reserved past its end gives that back).
    pub fn finish(mut self) -> io::Result<()> {
        if let Some(blocks) = self.blocks.as_mut() {
            let padded = self.held.next_multiple_of(BLOCK);
            as_bytes_mut(blocks)[self.held..padded].fill(0);
            self.held = padded;
            self.write_held()?;
        }
        self.file.set_len(self.written)
    }

    /// Writes the held blocks (whole blocks) and empties them. A file system that took
    /// the direct open but refuses the write gets it, and every later one, through the
    /// page cache.
    fn write_held(&mut self) -> io::Result<()> {
        let bytes = &as_bytes_mut(self.blocks.as_mut().expect("direct files hold blocks"))[..self.held];
        match self.file.write_all_at(bytes, self.flushed) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                clear_direct(&self.file)?;
                self.file.write_all_at(bytes, self.flushed)?;
            }
            written => written?,
        }
        self.flushed += bytes.len() as u64;
        self.held = 0;
        Ok(())
    }
}

fn as_bytes_mut(blocks: &mut [Block]) -> &mut [u8] {
    // SAFETY: `Block` is `repr(C)` over a byte array with no padding (its size is its
    // alignment), so the blocks are `size_of_val` contiguous, initialized bytes, borrowed
    // mutably for as long as the slice lives.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
}

/// Opens `path` for direct writes; `None` where the file system refuses them.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<Option<File>> {
    Ok(None)
}

#[cfg(target_os = "linux")]
fn clear_direct(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl takes the open descriptor of a file this function borrows and
    // integer flags; it touches no memory of the process.
    let cleared = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) == 0
    };
    if cleared {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn clear_direct(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths around the block and write sizes, written in uneven pieces.
    #[test]
    fn a_file_holds_exactly_what_was_written_either_way() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, BLOCK * BLOCKS_PER_WRITE, BLOCK * BLOCKS_PER_WRITE + 7, 5_000_003] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let path = dir.path().join(format!("out-{direct}-{len}"));
                let mut out = OutFile::create(&path, direct).unwrap();
                for piece in data.chunks(777_777) {
                    out.write_all(piece).unwrap();
                }
                out.finish().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), data, "direct {direct}, {len} bytes");
            }
        }
    }

    /// The fallback's step: where a direct file refuses a write (here an unaligned one,
    /// which ext4 and most file systems refuse), clearing `O_DIRECT` lets it through.
    #[test]
    fn a_refused_direct_write_goes_through_once_direct_io_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let Some(file) = open_direct(&path).unwrap() else {
            // This file system refuses direct opens: files fall back at `create` instead.
            return;
        };
        let refused = file.write_all_at(b"unaligned", 1);
        if refused.is_ok() {
            // This file system takes unaligned direct writes (tmpfs does): nothing to clear.
            return;
        }
        assert_eq!(refused.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        clear_direct(&file).unwrap();
        file.write_all_at(b"unaligned", 1).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\0unaligned");
    }

    /// A file that existed is truncated, not overwritten in part.
    #[test]
    fn a_shorter_file_replaces_a_longer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, vec![b'x'; 3 * BLOCK]).unwrap();
        let mut out = OutFile::create(&path, true).unwrap();
        out.write_all(b"short\n").unwrap();
        out.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short\n");
    }
}
