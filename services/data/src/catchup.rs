//! Partial catch-up: bringing a returning replica's stale copy of an extent
//! group up to date by copying only the blocks it missed.
//!
//! A replica that misses a write (its node down, restarting or cut off) is
//! dropped from the group's set. When it comes back still holding its file,
//! the owner compares which version of each block the file holds with a
//! current replica's and copies only the blocks that differ, each with its
//! original sequence, instead of the whole group (BRIEF: a planned restart
//! is a catch-up of the missed writes, not a rebuild).
//!
//! What makes this safe is the rule in [`catch_up_plan`]: a copied block
//! wins on the target only because its sequence is higher than the
//! target's version of that block (the file's index keeps, per block, the
//! record with the highest sequence, in any order). A target holding a
//! version the current replicas do not supersede — an old primary cut off
//! from the others appends writes it never gets acknowledged, and its
//! successor hands out the same sequences again for other data — cannot be
//! patched that way, and is copied whole as before.

use cairn_api::data::v1::BlockState;

use crate::egroup::Slot;

/// What a replica reports about one block: its newest version.
pub fn block_state(s: &Slot) -> BlockState {
    BlockState {
        mapped: s.is_mapped(),
        sequence: s.seq(),
        crc32c: match s {
            Slot::Data(l) => l.crc,
            Slot::Empty | Slot::Trimmed { .. } => 0,
        },
    }
}

/// Consecutive blocks the target must get from the source: one record of
/// the source's (a run never spans two sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRun {
    pub first_block: u32,
    pub block_count: u32,
    pub sequence: u64,
    /// The source's blocks are unmapped: the target gets a trim record.
    pub trim: bool,
}

/// The longest run one copy record carries (1 MiB of 4 KiB blocks).
const MAX_RUN: u32 = 256;

/// Two block states name the same version: same sequence, same kind, and
/// for data the same checksum (the sequence alone is not enough, see the
/// module doc).
fn same_version(a: &BlockState, b: &BlockState) -> bool {
    a.sequence == b.sequence && a.mapped == b.mapped && (!a.mapped || a.crc32c == b.crc32c)
}

/// The blocks to copy from `source` (a current replica) so that `target`
/// (a stale copy of the same group) holds the same version of every block,
/// or `None` when the target holds a version of some block that the
/// source's does not supersede, and must be copied whole. Both slices come
/// from replies that carried `versions`, for the same range of blocks.
pub fn catch_up_plan(source: &[BlockState], target: &[BlockState]) -> Option<Vec<CopyRun>> {
    if source.len() != target.len() {
        return None;
    }
    let mut runs: Vec<CopyRun> = Vec::new();
    for (i, (s, t)) in source.iter().zip(target).enumerate() {
        if same_version(s, t) {
            continue;
        }
        // Not older than the source's: a copy with the source's sequence
        // would not replace it.
        if t.sequence >= s.sequence {
            return None;
        }
        let b = i as u32;
        let trim = !s.mapped;
        match runs.last_mut() {
            Some(r)
                if r.first_block + r.block_count == b
                    && r.sequence == s.sequence
                    && r.trim == trim
                    && r.block_count < MAX_RUN =>
            {
                r.block_count += 1;
            }
            _ => runs.push(CopyRun {
                first_block: b,
                block_count: 1,
                sequence: s.sequence,
                trim,
            }),
        }
    }
    Some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egroup::tests::header;
    use crate::egroup::ExtentGroupFile;
    use crate::format::BLOCK_SIZE;
    use cairn_api::data::v1::RecordKind;
    use rand::{Rng, SeedableRng};

    const BLOCKS: u32 = 256;

    /// One write: data blocks (filled from `fill`) or a trim.
    #[derive(Clone)]
    struct Rec {
        seq: u64,
        epoch: u64,
        first: u32,
        count: u32,
        trim: bool,
        fill: u8,
    }

    fn apply(g: &mut ExtentGroupFile, r: &Rec) {
        if r.trim {
            g.append(
                RecordKind::RecordTrim,
                r.seq,
                r.epoch,
                r.first,
                r.count,
                &[],
                false,
            )
            .unwrap();
            return;
        }
        let mut data = vec![r.fill; r.count as usize * BLOCK_SIZE];
        for (i, b) in data.chunks_mut(BLOCK_SIZE).enumerate() {
            b[..8].copy_from_slice(&r.seq.to_le_bytes());
            b[8..12].copy_from_slice(&(r.first + i as u32).to_le_bytes());
        }
        g.append(
            RecordKind::RecordData,
            r.seq,
            r.epoch,
            r.first,
            r.count,
            &data,
            false,
        )
        .unwrap();
    }

    fn random_rec(rng: &mut impl Rng, seq: u64, epoch: u64) -> Rec {
        let count = rng.gen_range(1..=8);
        Rec {
            seq,
            epoch,
            first: rng.gen_range(0..=BLOCKS - count),
            count,
            trim: rng.gen_bool(0.1),
            fill: rng.gen(),
        }
    }

    fn states(g: &ExtentGroupFile) -> Vec<BlockState> {
        g.slots().iter().map(block_state).collect()
    }

    /// Runs the plan the way the owner does: each run read from the source
    /// and appended to the target with the source's sequence.
    fn catch_up(src: &ExtentGroupFile, dst: &mut ExtentGroupFile, runs: &[CopyRun], epoch: u64) {
        for r in runs {
            if r.trim {
                dst.append(
                    RecordKind::RecordTrim,
                    r.sequence,
                    epoch,
                    r.first_block,
                    r.block_count,
                    &[],
                    false,
                )
                .unwrap();
            } else {
                let data = src.read(r.first_block, r.block_count).unwrap();
                dst.append(
                    RecordKind::RecordData,
                    r.sequence,
                    epoch,
                    r.first_block,
                    r.block_count,
                    &data,
                    false,
                )
                .unwrap();
            }
        }
    }

    /// Histories where the target missed writes, got some of them late or
    /// out of order, and (sometimes) holds writes of a deposed primary
    /// whose sequences its successor used again: whenever a plan is made,
    /// applying it leaves the target reading exactly what the source reads,
    /// also after it is opened again from disk; a target that only missed
    /// writes is always caught up, never copied whole.
    #[test]
    fn a_caught_up_copy_reads_as_its_source_and_only_a_diverged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (mut planned, mut refused) = (0, 0);
        let (mut copied_blocks, mut whole_blocks) = (0u64, 0u64);
        for case in 0..300 {
            let sp = dir.path().join(format!("{case}-src.ceg"));
            let tp = dir.path().join(format!("{case}-dst.ceg"));
            let mut src = ExtentGroupFile::create(&sp, header(1)).unwrap();
            let mut dst = ExtentGroupFile::create(&tp, header(1)).unwrap();
            // Both replicas get a common history (arrival order differs).
            let common = rng.gen_range(0..60u64);
            let mut recs: Vec<Rec> = (1..=common).map(|s| random_rec(&mut rng, s, 1)).collect();
            for r in &recs {
                apply(&mut src, r);
            }
            let split = rng.gen_range(0..=recs.len());
            recs[..split].reverse();
            // The target misses some of the last ones (in flight when it left).
            let missed_tail = rng.gen_range(0..=recs.len().min(5));
            let keep = recs.len() - missed_tail;
            for r in &recs[..keep] {
                apply(&mut dst, r);
            }
            // A deposed primary's writes the others never saw.
            let diverged = rng.gen_bool(0.3);
            if diverged {
                for k in 0..rng.gen_range(1..4u64) {
                    apply(&mut dst, &random_rec(&mut rng, common + 1 + k, 1));
                }
            }
            // The current replicas go on (the same sequences again).
            let later = rng.gen_range(0..30u64);
            let after: Vec<Rec> = (1..=later)
                .map(|k| random_rec(&mut rng, common + k, 2))
                .collect();
            for r in &after {
                apply(&mut src, r);
            }
            // The target got some of those before it was dropped, unless a
            // deposed primary's copy (it was cut off for all of them).
            if !diverged {
                for r in after.iter().filter(|_| rng.gen_bool(0.2)) {
                    apply(&mut dst, r);
                }
            }

            let plan = catch_up_plan(&states(&src), &states(&dst));
            let Some(runs) = plan else {
                assert!(
                    diverged,
                    "case {case}: a target that only missed writes was refused"
                );
                refused += 1;
                continue;
            };
            planned += 1;
            copied_blocks += runs
                .iter()
                .filter(|r| !r.trim)
                .map(|r| u64::from(r.block_count))
                .sum::<u64>();
            whole_blocks += src.slots().iter().filter(|s| s.is_mapped()).count() as u64;
            catch_up(&src, &mut dst, &runs, 3);
            let want = src.read(0, BLOCKS).unwrap();
            assert_eq!(dst.read(0, BLOCKS).unwrap(), want, "case {case}");
            assert_eq!(dst.sequence_digest(), src.sequence_digest(), "case {case}");
            dst.sync().unwrap();
            drop(dst);
            let reopened = ExtentGroupFile::open(&tp, false).unwrap();
            assert_eq!(
                reopened.read(0, BLOCKS).unwrap(),
                want,
                "case {case} reopened"
            );
            assert_eq!(
                catch_up_plan(&states(&src), &states(&reopened)),
                Some(Vec::new()),
                "case {case}: nothing left to copy"
            );
        }
        eprintln!(
            "{planned} caught up, {refused} refused; {copied_blocks} blocks copied, \
             {whole_blocks} in whole copies"
        );
        // Both outcomes were exercised, and catching up copied a fraction of
        // what whole copies would have.
        assert!(
            planned > 150 && refused > 10,
            "{planned} planned, {refused} refused"
        );
        assert!(
            copied_blocks * 2 < whole_blocks,
            "{copied_blocks} blocks copied, {whole_blocks} in whole copies"
        );
    }

    #[test]
    fn equal_sequences_with_other_data_or_a_trim_are_not_the_same_version() {
        let data = |seq, crc| BlockState {
            mapped: true,
            sequence: seq,
            crc32c: crc,
        };
        let trim = |seq| BlockState {
            mapped: false,
            sequence: seq,
            crc32c: 0,
        };
        let empty = trim(0);
        // Same version: nothing to do.
        assert_eq!(catch_up_plan(&[data(5, 1)], &[data(5, 1)]), Some(vec![]));
        // Reused sequence, other data: refused.
        assert_eq!(catch_up_plan(&[data(5, 1)], &[data(5, 2)]), None);
        assert_eq!(catch_up_plan(&[trim(5)], &[data(5, 2)]), None);
        // The target wrote a block the source never had.
        assert_eq!(catch_up_plan(&[empty], &[data(3, 9)]), None);
        // Missed writes and trims become runs, split by sequence and kind.
        assert_eq!(
            catch_up_plan(
                &[data(7, 1), data(7, 2), trim(8), data(9, 4), empty],
                &[data(2, 1), empty, data(3, 3), data(9, 4), empty]
            ),
            Some(vec![
                CopyRun {
                    first_block: 0,
                    block_count: 2,
                    sequence: 7,
                    trim: false
                },
                CopyRun {
                    first_block: 2,
                    block_count: 1,
                    sequence: 8,
                    trim: true
                },
            ])
        );
    }
}
