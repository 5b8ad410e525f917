//! Building and reading the Merkle tree: directories (paged at content-defined boundaries
//! when large) and chunk lists of large files.

use kairos_core::Hash;

use crate::node::{self, ChunkList, ChunkRef, DirEntry, DirNode, PageRef};
use crate::object::ObjectKind;
use crate::store::{ObjectWriter, Reader, Result, StoreError};

/// A directory with at most this many entries (and bytes) is stored as one leaf.
pub const LEAF_ENTRIES_MAX: usize = 512;
pub const PAGE_BYTES_MAX: usize = 48 << 10;
/// Average entries per page of a large directory (a power of two).
pub const PAGE_ENTRIES_AVERAGE: u32 = 128;
/// Chunk references per chunk list node.
pub const CHUNK_LIST_ITEMS_MAX: usize = 2048;
/// Content-defined chunking of large files.
pub const CHUNK_BYTES_MIN: usize = 16 << 10;
pub const CHUNK_BYTES_AVERAGE: usize = 32 << 10;
pub const CHUNK_BYTES_MAX: usize = 64 << 10;
/// Files at most this large are stored whole, as one blob.
pub const BLOB_BYTES_MAX: usize = CHUNK_BYTES_MAX;

fn entry_bytes_estimate(entry: &DirEntry) -> usize {
    let body = match &entry.body {
        crate::node::Body::Symlink { target } => target.len(),
        crate::node::Body::Unreadable { error } => error.len(),
        crate::node::Body::File {
            content: crate::node::Content::Omitted { reason },
            ..
        } => reason.len(),
        _ => 0,
    };
    entry.name.len() + body + 160
}

/// Whether a page ends after an entry named `name`: decided by the name alone, so pages
/// before and after an edit keep their boundaries (a prolly tree).
fn is_boundary(name: &[u8]) -> bool {
    let hash = blake3::hash(name);
    let value = u32::from_le_bytes(hash.as_bytes()[..4].try_into().unwrap_or([0; 4]));
    value % PAGE_ENTRIES_AVERAGE == 0
}

/// Stores a directory whose `entries` are sorted by name; returns its node hash.
pub fn write_dir(writer: &ObjectWriter, entries: Vec<DirEntry>) -> Result<Hash> {
    debug_assert!(entries.windows(2).all(|pair| pair[0].name < pair[1].name));
    let total_bytes: usize = entries.iter().map(entry_bytes_estimate).sum();
    if entries.len() <= LEAF_ENTRIES_MAX && total_bytes <= PAGE_BYTES_MAX {
        let bytes = node::to_bytes(&DirNode::Leaf { entries });
        return writer.put(ObjectKind::Dir, &bytes);
    }
    let pages = split_pages(writer, entries)?;
    write_index(writer, pages)
}

/// Stores `entries` (sorted) as pages split at content-defined boundaries.
fn split_pages(writer: &ObjectWriter, entries: Vec<DirEntry>) -> Result<Vec<PageRef>> {
    let mut pages = Vec::new();
    let mut page: Vec<DirEntry> = Vec::new();
    let mut page_bytes = 0;
    for entry in entries {
        let entry_bytes = entry_bytes_estimate(&entry);
        let boundary = is_boundary(&entry.name);
        page_bytes += entry_bytes;
        page.push(entry);
        if boundary || page.len() >= LEAF_ENTRIES_MAX || page_bytes >= PAGE_BYTES_MAX {
            pages.push(write_page(writer, std::mem::take(&mut page))?);
            page_bytes = 0;
        }
    }
    if !page.is_empty() {
        pages.push(write_page(writer, page)?);
    }
    Ok(pages)
}

/// Puts `entry` under `name` in the directory `dir` (or removes `name` when `entry` is
/// `None`) and returns the new directory's hash. A large directory rewrites only the page
/// that holds `name` and the index above it; the rest is shared with `dir`.
pub fn edit_dir(
    reader: &Reader<'_>,
    writer: &ObjectWriter,
    dir: &Hash,
    name: &[u8],
    entry: Option<DirEntry>,
) -> Result<Hash> {
    fn edit(entries: &mut Vec<DirEntry>, name: &[u8], entry: Option<DirEntry>) {
        match (
            entries.binary_search_by(|e| e.name.as_slice().cmp(name)),
            entry,
        ) {
            (Ok(index), Some(entry)) => entries[index] = entry,
            (Ok(index), None) => {
                entries.remove(index);
            }
            (Err(index), Some(entry)) => entries.insert(index, entry),
            (Err(_), None) => {}
        }
    }
    if let Some(entry) = &entry {
        debug_assert_eq!(entry.name, name);
    }
    match reader.node::<DirNode>(dir, ObjectKind::Dir)? {
        DirNode::Leaf { mut entries } => {
            edit(&mut entries, name, entry);
            write_dir(writer, entries)
        }
        DirNode::Index { mut pages } => {
            let index = pages
                .partition_point(|page| page.first_name.as_slice() <= name)
                .saturating_sub(1);
            match reader.node::<DirNode>(&Hash(pages[index].node), ObjectKind::Dir)? {
                DirNode::Leaf { mut entries } => {
                    edit(&mut entries, name, entry);
                    let replacement = if entries.is_empty() {
                        Vec::new()
                    } else {
                        split_pages(writer, entries)?
                    };
                    pages.splice(index..=index, replacement);
                    if pages.is_empty() {
                        return write_dir(writer, Vec::new());
                    }
                    write_index(writer, pages)
                }
                // A directory with an index of indexes (tens of thousands of entries):
                // rewritten whole, which still shares every unchanged page.
                DirNode::Index { .. } => {
                    let mut entries = reader.dir_entries(dir)?;
                    edit(&mut entries, name, entry);
                    write_dir(writer, entries)
                }
            }
        }
    }
}

fn write_page(writer: &ObjectWriter, entries: Vec<DirEntry>) -> Result<PageRef> {
    let first_name = entries[0].name.clone();
    let count = entries.len() as u64;
    let bytes = node::to_bytes(&DirNode::Leaf { entries });
    Ok(PageRef {
        first_name,
        node: writer.put(ObjectKind::Dir, &bytes)?.0,
        entries: count,
    })
}

fn write_index(writer: &ObjectWriter, pages: Vec<PageRef>) -> Result<Hash> {
    if pages.len() <= LEAF_ENTRIES_MAX {
        return writer.put(ObjectKind::Dir, &node::to_bytes(&DirNode::Index { pages }));
    }
    let mut upper = Vec::new();
    let mut group: Vec<PageRef> = Vec::new();
    for page in pages {
        let boundary = is_boundary(&page.first_name);
        group.push(page);
        if boundary || group.len() >= LEAF_ENTRIES_MAX {
            upper.push(index_page(writer, std::mem::take(&mut group))?);
        }
    }
    if !group.is_empty() {
        upper.push(index_page(writer, group)?);
    }
    write_index(writer, upper)
}

fn index_page(writer: &ObjectWriter, pages: Vec<PageRef>) -> Result<PageRef> {
    let first_name = pages[0].first_name.clone();
    let entries = pages.iter().map(|page| page.entries).sum();
    let hash = writer.put(ObjectKind::Dir, &node::to_bytes(&DirNode::Index { pages }))?;
    Ok(PageRef {
        first_name,
        node: hash.0,
        entries,
    })
}

/// Depth of index levels accepted when reading (guards against cycles in corrupt data).
const INDEX_DEPTH_MAX: u32 = 8;

impl Reader<'_> {
    /// Every entry of the directory `hash`, in name order.
    pub fn dir_entries(&self, hash: &Hash) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.collect_dir(hash, 0, &mut out)?;
        Ok(out)
    }

    fn collect_dir(&self, hash: &Hash, depth: u32, out: &mut Vec<DirEntry>) -> Result<()> {
        if depth > INDEX_DEPTH_MAX {
            return Err(too_deep(hash));
        }
        match self.node::<DirNode>(hash, ObjectKind::Dir)? {
            DirNode::Leaf { entries } => out.extend(entries),
            DirNode::Index { pages } => {
                for page in pages {
                    self.collect_dir(&Hash(page.node), depth + 1, out)?;
                }
            }
        }
        Ok(())
    }

    /// The entry called `name` in directory `hash`, reading only the pages on its way.
    pub fn dir_lookup(&self, hash: &Hash, name: &[u8]) -> Result<Option<DirEntry>> {
        let mut current = *hash;
        for _ in 0..=INDEX_DEPTH_MAX {
            match self.node::<DirNode>(&current, ObjectKind::Dir)? {
                DirNode::Leaf { entries } => {
                    return Ok(entries
                        .binary_search_by(|entry| entry.name.as_slice().cmp(name))
                        .ok()
                        .map(|index| entries[index].clone()));
                }
                DirNode::Index { pages } => {
                    let index = pages.partition_point(|page| page.first_name.as_slice() <= name);
                    if index == 0 {
                        return Ok(None);
                    }
                    current = Hash(pages[index - 1].node);
                }
            }
        }
        Err(too_deep(hash))
    }

    /// The chunks of a large file, in order.
    pub fn chunks(&self, list: &Hash) -> Result<Vec<ChunkRef>> {
        let mut out = Vec::new();
        self.collect_chunks(list, None, &mut out)?;
        Ok(out)
    }

    fn collect_chunks(
        &self,
        list: &Hash,
        expect_level: Option<u8>,
        out: &mut Vec<ChunkRef>,
    ) -> Result<()> {
        let node = self.node::<ChunkList>(list, ObjectKind::ChunkList)?;
        if expect_level.is_some_and(|level| level != node.level) || node.level > 4 {
            return Err(StoreError::BadNode {
                hash: *list,
                kind: ObjectKind::ChunkList.name(),
                problem: format!("unexpected level {}", node.level),
            });
        }
        if node.level == 0 {
            out.extend(node.items);
        } else {
            for item in node.items {
                self.collect_chunks(&Hash(item.hash), Some(node.level - 1), out)?;
            }
        }
        Ok(())
    }
}

fn too_deep(hash: &Hash) -> StoreError {
    StoreError::BadNode {
        hash: *hash,
        kind: ObjectKind::Dir.name(),
        problem: format!("index deeper than {INDEX_DEPTH_MAX} levels"),
    }
}

/// Stores the chunk list of a large file; returns its hash.
pub fn write_chunk_list(writer: &ObjectWriter, chunks: Vec<ChunkRef>) -> Result<Hash> {
    let mut level = 0u8;
    let mut items = chunks;
    loop {
        if items.len() <= CHUNK_LIST_ITEMS_MAX {
            let bytes = node::to_bytes(&ChunkList { level, items });
            return writer.put(ObjectKind::ChunkList, &bytes);
        }
        let mut upper = Vec::with_capacity(items.len() / CHUNK_LIST_ITEMS_MAX + 1);
        for group in items.chunks(CHUNK_LIST_ITEMS_MAX) {
            let bytes = node::to_bytes(&ChunkList {
                level,
                items: group.to_vec(),
            });
            upper.push(ChunkRef {
                hash: writer.put(ObjectKind::ChunkList, &bytes)?.0,
                bytes: group.iter().map(|item| item.bytes).sum(),
            });
        }
        items = upper;
        level += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Body, Content, Meta};
    use crate::store::Store;
    use proptest::prelude::*;

    fn entry(name: Vec<u8>) -> DirEntry {
        DirEntry {
            name,
            meta: Meta::default(),
            body: Body::File {
                content: Content::Empty,
                config: None,
                torn: false,
            },
        }
    }

    fn write(store: &Store, names: &[Vec<u8>]) -> Hash {
        let writer = store.object_writer("t").unwrap();
        let hash = write_dir(&writer, names.iter().cloned().map(entry).collect()).unwrap();
        writer.finish().unwrap();
        hash
    }

    #[test]
    fn large_directory_pages_and_edits_touch_few_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut names: Vec<Vec<u8>> = (0..20_000)
            .map(|i| format!("file-{i:06}").into_bytes())
            .collect();
        names.sort();
        let before = write(&store, &names);
        let reader = store.reader().unwrap();
        let listed = reader.dir_entries(&before).unwrap();
        assert_eq!(listed.len(), names.len());
        assert!(
            reader
                .dir_lookup(&before, b"file-012345")
                .unwrap()
                .is_some()
        );
        assert!(
            reader
                .dir_lookup(&before, b"file-0123456")
                .unwrap()
                .is_none()
        );
        assert!(reader.dir_lookup(&before, b"a").unwrap().is_none());

        names.insert(5_001, b"file-005000a".to_vec());
        let writer = store.object_writer("t").unwrap();
        write_dir(&writer, names.iter().cloned().map(entry).collect()).unwrap();
        let stats = writer.finish().unwrap();
        assert!(
            stats.objects_new <= 3,
            "an insert rewrote {} nodes",
            stats.objects_new
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn any_directory_round_trips(names in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 1..40), 0..3000)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let names: Vec<Vec<u8>> = names.into_iter().collect();
            let hash = write(&store, &names);
            let reader = store.reader().unwrap();
            let listed: Vec<Vec<u8>> = reader.dir_entries(&hash).unwrap().into_iter().map(|e| e.name).collect();
            prop_assert_eq!(&listed, &names);
            for name in names.iter().step_by(97) {
                prop_assert!(reader.dir_lookup(&hash, name).unwrap().is_some());
            }
        }
    }

    #[test]
    fn edits_of_large_directories_read_back_like_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut names: Vec<Vec<u8>> = (0..3_000)
            .map(|i| format!("f{i:05}").into_bytes())
            .collect();
        names.sort();
        let hash0 = write(&store, &names);
        let mut hash = hash0;
        let writer = store.object_writer("t").unwrap();
        let overlay = writer.keep_written();
        for (name, keep) in [
            (b"f01500a".to_vec(), true),
            (b"f00000".to_vec(), false),
            (b"a-first".to_vec(), true),
            (b"zz-last".to_vec(), true),
        ] {
            let reader = store.reader().unwrap().with_overlay(overlay.clone());
            hash = edit_dir(
                &reader,
                &writer,
                &hash,
                &name,
                keep.then(|| entry(name.clone())),
            )
            .unwrap();
            match names.binary_search(&name) {
                Ok(index) if !keep => {
                    names.remove(index);
                }
                Err(index) if keep => names.insert(index, name),
                _ => {}
            }
        }
        let stats = writer.finish().unwrap();
        assert!(
            stats.objects_new <= 12,
            "{} nodes written",
            stats.objects_new
        );
        assert_ne!(hash, hash0);
        let reader = store.reader().unwrap();
        let listed: Vec<Vec<u8>> = reader
            .dir_entries(&hash)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(listed, names);
        assert!(reader.dir_lookup(&hash, b"a-first").unwrap().is_some());
        assert!(reader.dir_lookup(&hash, b"f00000").unwrap().is_none());
    }

    #[test]
    fn chunk_lists_nest_and_flatten_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunks: Vec<ChunkRef> = (0..5_000u32)
            .map(|i| ChunkRef {
                hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
                bytes: u64::from(i),
            })
            .collect();
        let writer = store.object_writer("t").unwrap();
        let list = write_chunk_list(&writer, chunks.clone()).unwrap();
        writer.finish().unwrap();
        assert_eq!(store.reader().unwrap().chunks(&list).unwrap(), chunks);
    }
}
