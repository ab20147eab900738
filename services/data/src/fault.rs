//! Fault models that the unit tests here and the process tests in
//! `cairn-tests` share, so both tear extent group files the same way.

/// What a power loss did to the bytes of a file that no sync covered: the
/// model LazyFS implements (etcd and Jepsen use it). Page-cache writeback is
/// not ordered and some filesystems persist a file's size before its data,
/// so any page after the last sync may or may not have reached the disk,
/// and the file may end anywhere after what was synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsyncedLoss {
    /// Each 4 KiB page after `durable_end` is lost (reads as zeros) or not,
    /// as `lose_page` says.
    Pages,
    /// Everything after `durable_end` reads as zeros; the size stays.
    All,
    /// The file ends at this offset (clamped to `durable_end..=len`).
    CutAt(usize),
}

/// Applies `loss` to a file's bytes, of which `[0, durable_end)` is durable.
pub fn lose_unsynced(
    bytes: &mut Vec<u8>,
    durable_end: usize,
    loss: UnsyncedLoss,
    mut lose_page: impl FnMut() -> bool,
) {
    let durable_end = durable_end.min(bytes.len());
    match loss {
        UnsyncedLoss::Pages => {
            let mut page = durable_end / 4096 * 4096;
            while page < bytes.len() {
                if lose_page() {
                    let end = (page + 4096).min(bytes.len());
                    bytes[page.max(durable_end)..end].fill(0);
                }
                page += 4096;
            }
        }
        UnsyncedLoss::All => bytes[durable_end..].fill(0),
        UnsyncedLoss::CutAt(at) => bytes.truncate(at.max(durable_end)),
    }
}
