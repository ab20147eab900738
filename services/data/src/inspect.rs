//! The offline tool's logic (`cairn extent inspect|verify|export`): reads
//! extent group files alone, with no metadata service, which is what proves
//! that they describe themselves.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_api::data::v1::Codec;

use crate::egroup::{ExtentGroupFile, Slot};
use crate::format::BLOCK_SIZE;
use crate::store::group_files;
use crate::DataError;

/// Human-readable description of one file: header, records, checksum state.
pub fn inspect(path: &Path) -> Result<String, DataError> {
    let f = ExtentGroupFile::open(path, false)?;
    let h = f.header();
    let bad = f.verify();
    let mapped = f.slots().iter().filter(|s| s.is_mapped()).count();
    let trimmed = f
        .slots()
        .iter()
        .filter(|s| matches!(s, Slot::Trimmed { .. }))
        .count();
    let mut o = String::new();
    let codec = Codec::try_from(h.codec)
        .map(|c| c.as_str_name())
        .unwrap_or("unknown");
    o.push_str(&format!("file:             {}\n", path.display()));
    o.push_str(&format!("format_version:   {}\n", h.format_version));
    o.push_str(&format!("cluster_id:       {}\n", h.cluster_id));
    o.push_str(&format!("extent_group_id:  {}\n", h.extent_group_id));
    o.push_str(&format!("vdisk_id:         {}\n", h.vdisk_id));
    o.push_str(&format!("vdisk_generation: {}\n", h.vdisk_generation));
    if !h.parent_vdisk_id.is_empty() {
        o.push_str(&format!(
            "parent:           {} @ generation {}\n",
            h.parent_vdisk_id, h.parent_generation
        ));
    }
    o.push_str(&format!(
        "vblocks:          {}..{} ({} x {} bytes, vdisk offset {})\n",
        h.first_vblock,
        h.first_vblock + u64::from(h.vblock_count),
        h.vblock_count,
        h.vblock_size,
        h.first_vblock * u64::from(h.vblock_size)
    ));
    o.push_str(&format!("codec:            {codec}\n"));
    o.push_str("checksum:         crc32c per 4096-byte block\n");
    o.push_str(&format!(
        "epoch:            {} (created with {})\n",
        f.epoch(),
        h.epoch
    ));
    o.push_str(&format!("max_sequence:     {}\n", f.max_sequence()));
    o.push_str(&format!("records:          {}\n", f.report().records));
    o.push_str(&format!("file_bytes:       {}\n", f.file_len()));
    o.push_str(&format!(
        "blocks:           {} mapped, {} trimmed, {} never written\n",
        mapped,
        trimmed,
        f.slots().len() - mapped - trimmed
    ));
    match f.report().durable_end {
        Some(end) => o.push_str(&format!(
            "durable_end:      {end} (what the last sync covered; records after it are checked at open)\n"
        )),
        None => o.push_str("durable_end:      none (written before sync marks)\n"),
    }
    if f.report().torn_tail_bytes > 0 {
        o.push_str(&format!(
            "torn_tail:        {} bytes (written after the last sync and torn by a crash; never acknowledged as durable)\n",
            f.report().torn_tail_bytes
        ));
    }
    match checkpoint_check(path, &f) {
        Ok(0) => o.push_str("index_checkpoint: none usable (a start scans the whole file)\n"),
        Ok(n) => o.push_str(&format!(
            "index_checkpoint: covers {n} records; agrees with the whole scan\n"
        )),
        Err(e) => o.push_str(&format!("index_checkpoint: {e}\n")),
    }
    if let Some(d) = &f.report().damage {
        o.push_str(&format!("damage:           {d}\n"));
    }
    if bad.is_empty() {
        o.push_str("checksums:        ok\n");
    } else {
        o.push_str(&format!(
            "checksums:        {} BAD blocks: {:?}\n",
            bad.len(),
            bad
        ));
    }
    Ok(o)
}

/// Problems of one file (empty when it is healthy).
pub fn verify_file(path: &Path) -> Vec<String> {
    match ExtentGroupFile::open(path, false) {
        Err(e) => vec![e.to_string()],
        Ok(f) => {
            let mut out = Vec::new();
            let bad = f.verify();
            if !bad.is_empty() {
                out.push(format!("checksum mismatch in blocks {bad:?}"));
            }
            if let Some(d) = &f.report().damage {
                out.push(d.clone());
            }
            if let Err(e) = checkpoint_check(path, &f) {
                out.push(e);
            }
            out
        }
    }
}

/// How many records the file's index checkpoint covers (0: it has no
/// usable one), after checking that the index a start would build from it
/// is the one a scan of every record builds. An error says they disagree:
/// a start would serve from a wrong index (the checkpoint should be
/// deleted; the node then scans the file whole). A file a running node
/// appends to between the two opens is opened again (up to three times).
fn checkpoint_check(path: &Path, whole: &ExtentGroupFile) -> Result<u64, String> {
    let mut again: Option<ExtentGroupFile> = None;
    for _ in 0..3 {
        let whole = again.as_ref().unwrap_or(whole);
        let ix = ExtentGroupFile::open_indexed(path, false).map_err(|e| e.to_string())?;
        let n = ix.report().from_checkpoint;
        if n == 0 {
            return Ok(0);
        }
        if ix.file_len() != whole.file_len() {
            again = Some(ExtentGroupFile::open(path, false).map_err(|e| e.to_string())?);
            continue;
        }
        let same = ix.slots() == whole.slots()
            && ix.max_sequence() == whole.max_sequence()
            && ix.epoch() == whole.epoch();
        return if same {
            Ok(n)
        } else {
            Err(format!(
                "index checkpoint {} disagrees with the file's records",
                crate::checkpoint::path_for(path).display()
            ))
        };
    }
    Ok(0)
}

/// Outcome of verifying a set of folders.
#[derive(Debug, Default)]
pub struct VerifySummary {
    pub files: u64,
    pub blocks_checked: u64,
    /// (file, what is wrong)
    pub problems: Vec<(PathBuf, String)>,
}

/// Verifies every block of every extent group file under `dirs`.
pub fn verify(dirs: &[PathBuf]) -> VerifySummary {
    let mut s = VerifySummary::default();
    for dir in dirs {
        for path in group_files(dir) {
            s.files += 1;
            match ExtentGroupFile::open(&path, false) {
                Err(e) => s.problems.push((path, e.to_string())),
                Ok(f) => {
                    s.blocks_checked += f.slots().iter().filter(|x| x.is_mapped()).count() as u64;
                    let bad = f.verify();
                    if !bad.is_empty() {
                        s.problems
                            .push((path.clone(), format!("checksum mismatch in blocks {bad:?}")));
                    }
                    if let Some(d) = &f.report().damage {
                        s.problems.push((path.clone(), d.clone()));
                    }
                    if let Err(e) = checkpoint_check(&path, &f) {
                        s.problems.push((path, e));
                    }
                }
            }
        }
    }
    s
}

/// Outcome of an export.
#[derive(Debug, Default)]
pub struct ExportSummary {
    pub size: u64,
    pub blocks_written: u64,
    pub files_used: u64,
    /// Files that could not be read (other replicas were used where they exist).
    pub skipped: Vec<(PathBuf, String)>,
    /// Blocks no readable replica had a verified copy of.
    pub unrecoverable_blocks: u64,
}

/// Rebuilds vdisk `vdisk_id` as a raw image at `out` from the extent group
/// files under `dirs` (typically every node's disks), following clone
/// lineage. `generation` picks a snapshot (the view as of that generation);
/// `size` overrides the size recorded in the files.
pub fn export(
    vdisk_id: &str,
    dirs: &[PathBuf],
    out: &Path,
    generation: Option<u64>,
    size: Option<u64>,
) -> Result<ExportSummary, DataError> {
    let mut summary = ExportSummary::default();
    let mut files: Vec<ExtentGroupFile> = Vec::new();
    for dir in dirs {
        for path in group_files(dir) {
            match ExtentGroupFile::open(&path, false) {
                Ok(f) => files.push(f),
                Err(e) => summary.skipped.push((path, e.to_string())),
            }
        }
    }
    let image_size = match size {
        Some(s) => s,
        None => files
            .iter()
            .filter(|f| f.header().vdisk_id == vdisk_id)
            .map(|f| f.header().vdisk_size_bytes.max(end_of(f)))
            .max()
            .ok_or_else(|| DataError::NotFound(format!("extent groups of vdisk {vdisk_id}")))?,
    };
    let o = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(|e| DataError::io(out, e))?;
    o.set_len(image_size).map_err(|e| DataError::io(out, e))?;
    let total_blocks = image_size.div_ceil(BLOCK_SIZE as u64);
    // Resolve each block through the lineage: the vdisk itself, then its parent.
    let mut used = std::collections::BTreeSet::new();
    for block in 0..total_blocks {
        let mut vd = vdisk_id.to_string();
        let mut gen = generation.unwrap_or(u64::MAX);
        for _depth in 0..64 {
            match resolve(&files, &vd, gen, block) {
                Resolved::Data(bytes, idx) => {
                    used.insert(idx);
                    let at = block * BLOCK_SIZE as u64;
                    let n = (image_size - at).min(BLOCK_SIZE as u64) as usize;
                    o.write_all_at(&bytes[..n], at)
                        .map_err(|e| DataError::io(out, e))?;
                    summary.blocks_written += 1;
                    break;
                }
                Resolved::Zero => break,
                Resolved::Unrecoverable => {
                    summary.unrecoverable_blocks += 1;
                    break;
                }
                Resolved::Parent(p, g) => {
                    vd = p;
                    gen = g;
                }
                Resolved::Nothing => break,
            }
        }
    }
    let mut o = o;
    o.flush().map_err(|e| DataError::io(out, e))?;
    o.sync_all().map_err(|e| DataError::io(out, e))?;
    summary.size = image_size;
    summary.files_used = used.len() as u64;
    Ok(summary)
}

fn end_of(f: &ExtentGroupFile) -> u64 {
    (f.header().first_vblock + u64::from(f.header().vblock_count))
        * u64::from(f.header().vblock_size)
}

enum Resolved {
    Data(Vec<u8>, usize),
    Zero,
    Unrecoverable,
    Parent(String, u64),
    Nothing,
}

fn resolve(files: &[ExtentGroupFile], vdisk: &str, gen: u64, block: u64) -> Resolved {
    let byte = block * BLOCK_SIZE as u64;
    // Files of this vdisk covering the block, at the newest generation <= gen.
    let covering: Vec<(usize, &ExtentGroupFile)> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            let h = f.header();
            let start = h.first_vblock * u64::from(h.vblock_size);
            h.vdisk_id == vdisk && h.vdisk_generation <= gen && byte >= start && byte < end_of(f)
        })
        .collect();
    let Some(newest) = covering
        .iter()
        .map(|(_, f)| f.header().vdisk_generation)
        .max()
    else {
        // The vdisk never wrote this vblock: a clone reads it from its parent.
        let parent = files
            .iter()
            .find(|f| f.header().vdisk_id == vdisk && !f.header().parent_vdisk_id.is_empty());
        return match parent {
            Some(f) => Resolved::Parent(
                f.header().parent_vdisk_id.clone(),
                f.header().parent_generation,
            ),
            None => Resolved::Nothing,
        };
    };
    // Replicas of the newest group: per block, the highest sequence that verifies.
    let mut by_seq: BTreeMap<u64, Vec<(usize, u32)>> = BTreeMap::new();
    let mut zero_seq = 0;
    for (idx, f) in covering
        .iter()
        .filter(|(_, f)| f.header().vdisk_generation == newest)
    {
        let h = f.header();
        let b = ((byte - h.first_vblock * u64::from(h.vblock_size)) / BLOCK_SIZE as u64) as u32;
        match f.slots().get(b as usize) {
            Some(Slot::Data(l)) => by_seq.entry(l.seq).or_default().push((*idx, b)),
            Some(Slot::Trimmed { seq }) => zero_seq = zero_seq.max(*seq),
            _ => {}
        }
    }
    // Only the newest version counts: an older one that verifies is still wrong data.
    match by_seq.iter().next_back() {
        Some((seq, candidates)) if *seq >= zero_seq => {
            for (idx, b) in candidates {
                if let Ok(bytes) = files[*idx].read(*b, 1) {
                    return Resolved::Data(bytes, *idx);
                }
            }
            Resolved::Unrecoverable
        }
        _ => Resolved::Zero,
    }
}
