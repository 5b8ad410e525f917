//! Writing a file with holes: blocks of zeros are skipped with a seek instead of written,
//! and the length is set at the end, so a file captured sparse is restored sparse (a 2 GB
//! file with a few written blocks takes a few blocks on disk, not 2 GB).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

/// Granularity of holes: a whole block of zeros, aligned in the file, is skipped.
pub const HOLE_BLOCK_BYTES: u64 = 4096;

/// A writer that leaves aligned blocks of zeros as holes (when `sparse`), or writes
/// everything (otherwise). [`SparseWriter::finish`] writes what is pending and sets the
/// final length.
pub struct SparseWriter {
    file: File,
    sparse: bool,
    /// Bytes of the current aligned block not decided yet (fewer than a block).
    pending: Vec<u8>,
    /// Where `pending` starts in the file (a multiple of the block size when sparse).
    position: u64,
    /// Where the file's cursor is (differs from `position` after a skipped block).
    cursor: u64,
}

impl SparseWriter {
    pub fn new(file: File, sparse: bool) -> SparseWriter {
        SparseWriter {
            file,
            sparse,
            pending: Vec::with_capacity(HOLE_BLOCK_BYTES as usize),
            position: 0,
            cursor: 0,
        }
    }

    fn write_at_position(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.cursor != self.position {
            self.file.seek(SeekFrom::Start(self.position))?;
            self.cursor = self.position;
        }
        self.file.write_all(bytes)?;
        self.position += bytes.len() as u64;
        self.cursor = self.position;
        Ok(())
    }

    /// Writes or skips whole blocks: runs of non-zero blocks go out in one call each.
    fn emit_blocks(&mut self, blocks: &[u8]) -> std::io::Result<()> {
        let block = HOLE_BLOCK_BYTES as usize;
        let is_zero = |bytes: &[u8]| bytes.iter().all(|byte| *byte == 0);
        let mut at = 0;
        while at < blocks.len() {
            if is_zero(&blocks[at..at + block]) {
                self.position += block as u64;
                at += block;
                continue;
            }
            let mut end = at + block;
            while end < blocks.len() && !is_zero(&blocks[end..end + block]) {
                end += block;
            }
            self.write_at_position(&blocks[at..end])?;
            at = end;
        }
        Ok(())
    }

    /// Writes what is pending, sets the length (a file ending in zeros ends in a hole) and
    /// returns the file.
    pub fn finish(mut self) -> std::io::Result<File> {
        let pending = std::mem::take(&mut self.pending);
        if pending.iter().any(|byte| *byte != 0) {
            self.write_at_position(&pending)?;
        } else {
            self.position += pending.len() as u64;
        }
        if self.cursor != self.position {
            self.file.set_len(self.position)?;
        }
        Ok(self.file)
    }
}

impl Write for SparseWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.sparse {
            self.write_at_position(buf)?;
            return Ok(buf.len());
        }
        let block = HOLE_BLOCK_BYTES as usize;
        let mut rest = buf;
        if !self.pending.is_empty() {
            let take = (block - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() < block {
                return Ok(buf.len());
            }
            let full = std::mem::take(&mut self.pending);
            self.emit_blocks(&full)?;
            self.pending = full;
            self.pending.clear();
        }
        let whole = rest.len() / block * block;
        self.emit_blocks(&rest[..whole])?;
        self.pending.extend_from_slice(&rest[whole..]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_blocks_become_holes_and_the_bytes_are_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut expected = vec![0u8; 8 << 20];
        expected[5000..5010].copy_from_slice(b"0123456789");
        expected[(4 << 20) + 1..(4 << 20) + 3].copy_from_slice(b"ab");
        let mut writer = SparseWriter::new(File::create(&path).unwrap(), true);
        for piece in expected.chunks(70_001) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.len(), 8 << 20);
        assert!(
            metadata.blocks() * 512 <= 64 << 10,
            "{} bytes allocated for 8 MiB with two written blocks",
            metadata.blocks() * 512
        );
    }

    #[test]
    fn dense_mode_writes_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dense");
        let mut writer = SparseWriter::new(File::create(&path).unwrap(), false);
        writer.write_all(&vec![0u8; 1 << 20]).unwrap();
        writer.finish().unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.len(), 1 << 20);
        assert!(metadata.blocks() * 512 >= 1 << 20);
    }
}
