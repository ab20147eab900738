//! Data service acceptance: real `cairn` processes, real extent files, I/O
//! through the front-end trait (forwarded over each node's RPC port).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::Result;
use cairn_tests::{serial, Cluster};
use serde_json::json;

const BS: usize = 4096;
const MIB: u64 = 1 << 20;

/// A 4 KiB block that says where it belongs and which write made it.
fn block(offset: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    b[..8].copy_from_slice(&offset.to_le_bytes());
    b[8..16].copy_from_slice(&gen.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (offset / BS as u64 + gen * 31 + i as u64 / 7) as u8;
    }
    b
}

fn check_block(got: &[u8], offset: u64, gen: u64) {
    let want = block(offset, gen);
    if got != want.as_slice() {
        let g_off = u64::from_le_bytes(got[..8].try_into().unwrap());
        let g_gen = u64::from_le_bytes(got[8..16].try_into().unwrap());
        panic!(
            "block at {offset}: expected generation {gen}, found offset {g_off} generation {g_gen}"
        );
    }
}

/// Writes every block of `io`'s first `size` bytes as generation `gen`, a
/// MiB per write; returns what was written.
fn write_all_blocks(io: &cairn_tests::BlockClient, size: u64, gen: u64) -> Result<Vec<u8>> {
    let data: Vec<u8> = (0..size / BS as u64)
        .flat_map(|b| block(b * BS as u64, gen))
        .collect();
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        io.write(i as u64 * MIB, chunk)?;
    }
    Ok(data)
}

/// Runs `cairn ARGS <every node's disk folder>`; an error if it fails.
fn on_all_disks(c: &Cluster, args: &[&str]) -> Result<String> {
    let dirs: Vec<String> = c
        .disk_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let mut all = args.to_vec();
    all.extend(dirs.iter().map(String::as_str));
    c.cli_ok(&all)
}

fn extent_files(dir: &std::path::Path) -> Vec<PathBuf> {
    cairn_data::store::group_files(dir)
}

#[test]
fn replicated_writes_read_back_export_and_repair_byte_flips() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(3)?;
    let size = 16 * MIB;
    let vd = c.make_vdisk("rf2", 2, "disk1", size, 0)?;
    let io = c.block(0, &vd)?;

    // Scattered 4 KiB writes, a 1 MiB write across a vblock edge, then overwrites.
    let mut latest: HashMap<u64, u64> = HashMap::new();
    for i in 0..64u64 {
        let off = (i * 37 % 4096) * BS as u64;
        io.write(off, &block(off, 1))?;
        latest.insert(off, 1);
    }
    let big_off = 3 * MIB - 512 * 1024;
    let big: Vec<u8> = (0..256u64)
        .flat_map(|k| block(big_off + k * BS as u64, 2))
        .collect();
    io.write(big_off, &big)?;
    for k in 0..256u64 {
        latest.insert(big_off + k * BS as u64, 2);
    }
    for (off, gen) in latest
        .iter_mut()
        .filter(|(o, _)| **o % (3 * BS as u64) == 0)
    {
        io.write(*off, &block(*off, 3))?;
        *gen = 3;
    }

    // Read back through the owner and through a node that forwards to it.
    for via in [0, 2] {
        let r = c.block(via, &vd)?;
        for (off, gen) in &latest {
            check_block(&r.read(*off, BS as u64)?, *off, *gen);
        }
    }
    // Compare-and-write through a node that forwards to the owner: a match
    // writes, a mismatch names the first differing byte and writes nothing.
    let via = c.block(2, &vd)?;
    let off = 5 * MIB;
    via.write(off, &block(off, 4))?;
    via.compare_and_write(off, &block(off, 4), &block(off, 5))?;
    check_block(&io.read(off, BS as u64)?, off, 5);
    let err = via
        .compare_and_write(off, &block(off, 4), &block(off, 6))
        .unwrap_err()
        .to_string();
    assert!(err.contains("compare failed at byte 8"), "{err}");
    check_block(&io.read(off, BS as u64)?, off, 5);
    latest.insert(off, 5);

    // Thin: block status (asked through the forwarding node) shows exactly
    // what was written.
    assert_eq!(
        via.block_status(15 * MIB, MIB)?,
        vec![(15 * MIB, MIB, false)]
    );
    let st = via.block_status(off - BS as u64, 3 * BS as u64)?;
    assert_eq!(
        st,
        vec![
            (off - BS as u64, BS as u64, false),
            (off, BS as u64, true),
            (off + BS as u64, BS as u64, false)
        ]
    );

    // Unwritten space reads as zeros.
    assert!(io.read(15 * MIB, MIB)?.iter().all(|b| *b == 0));

    // RF2: every vblock's group has files on exactly two nodes.
    let per_node: Vec<usize> = c
        .nodes
        .iter()
        .map(|n| extent_files(&n.dir.join("disks")).len())
        .collect();
    assert!(
        per_node[0] > 0,
        "the owner holds a replica of everything: {per_node:?}"
    );
    assert_eq!(
        per_node.iter().sum::<usize>(),
        2 * per_node[0],
        "two replicas per group: {per_node:?}"
    );

    // Offline: verify all files, and export the image from files alone.
    on_all_disks(&c, &["extent", "verify"])?;
    let img = c.root.path().join("export.img");
    let img_s = img.display().to_string();
    on_all_disks(
        &c,
        &[
            "extent",
            "export",
            "--vdisk",
            vd.as_str(),
            "-o",
            img_s.as_str(),
        ],
    )?;
    let exported = std::fs::read(&img)?;
    assert_eq!(exported.len() as u64, size);
    let live = io.read(0, size)?;
    assert!(
        exported == live,
        "export differs from what the cluster serves"
    );
    for (off, gen) in &latest {
        check_block(&exported[*off as usize..*off as usize + BS], *off, *gen);
    }

    // Flip bytes in the owner's extent files (inside data, past the superblock).
    let files = extent_files(&c.nodes[0].dir.join("disks"));
    for f in &files {
        let len = std::fs::metadata(f)?.len();
        let h = std::fs::OpenOptions::new().write(true).open(f)?;
        for k in 1..4u64 {
            let at = 4096 + (len - 4096) * k / 4;
            h.write_all_at(&[0xA5, 0x5A, 0xFF], at)?;
        }
    }
    for (off, gen) in &latest {
        check_block(&io.read(*off, BS as u64)?, *off, *gen);
    }
    let log = c.nodes[0].log();
    let repairs = log
        .matches("rewrote the blocks from a healthy replica")
        .count();
    assert!(repairs > 0, "no repair logged:\n{}", c.logs_tail());
    let stats = c.get(0, "/v1/node/stats")?;
    let counted = stats.body["data"]["checksum_repairs"].as_u64().unwrap_or(0);
    assert!(
        counted >= 1,
        "repair counter not incremented: {}",
        stats.body
    );
    // The owner's copies were rewritten: its files verify clean again.
    let d0 = c.nodes[0].dir.join("disks").display().to_string();
    c.cli_ok(&["extent", "verify", d0.as_str()])?;
    Ok(())
}

/// What a writer knows: the last acknowledged generation of each block, and
/// a newer generation whose write failed (it may or may not have landed).
#[derive(Default, Clone)]
struct Ledger {
    acked: HashMap<u64, u64>,
    /// Every write to a block that failed since its last acknowledged one:
    /// a failed write's outcome is unknown, so any of them may show.
    maybe: HashMap<u64, Vec<u64>>,
    ok: u64,
    failed: u64,
}

fn spawn_writer(
    io: cairn_tests::BlockClient,
    size: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ledger: std::sync::Arc<std::sync::Mutex<Ledger>>,
) -> std::thread::JoinHandle<()> {
    spawn_writer_from(io, size, stop, ledger, 0)
}

/// [`spawn_writer`] whose generations start after `gen`: writers that take
/// turns on one ledger must not reuse each other's generations.
fn spawn_writer_from(
    io: cairn_tests::BlockClient,
    size: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ledger: std::sync::Arc<std::sync::Mutex<Ledger>>,
    mut gen: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let blocks = size / BS as u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            gen += 1;
            let off = (rand::random::<u64>() % blocks) * BS as u64;
            match io.write(off, &block(off, gen)) {
                Ok(()) => {
                    let mut l = ledger.lock().unwrap();
                    l.acked.insert(off, gen);
                    l.maybe.remove(&off);
                    l.ok += 1;
                }
                Err(_) => {
                    let mut l = ledger.lock().unwrap();
                    l.maybe.entry(off).or_default().push(gen);
                    l.failed += 1;
                    drop(l);
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
    })
}

/// A read that retries "unavailable" for up to 30 s, as a host retries
/// NOT READY: right after a failover or a heal, a node may not have heard
/// the metadata leader yet.
fn read_retrying(io: &cairn_tests::BlockClient, off: u64, len: u64) -> Result<Vec<u8>> {
    let t0 = std::time::Instant::now();
    loop {
        match io.read(off, len) {
            Err(e) if e.to_string().starts_with("Unavailable") && t0.elapsed().as_secs() < 30 => {
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            r => return r,
        }
    }
}

fn check_ledger(io: &cairn_tests::BlockClient, l: &Ledger) -> Result<()> {
    for (off, gen) in &l.acked {
        let got = read_retrying(io, *off, BS as u64)?;
        let g = u64::from_le_bytes(got[8..16].try_into().unwrap());
        let allowed = l.maybe.get(off).cloned().unwrap_or_default();
        if g == *gen {
            check_block(&got, *off, *gen);
        } else if allowed.contains(&g) {
            check_block(&got, *off, g);
        } else {
            anyhow::bail!("block at {off}: acknowledged generation {gen}, read {g} (unacknowledged candidates {allowed:?})");
        }
    }
    Ok(())
}

/// [`check_ledger`] through every node, with the nodes' logs on a failure.
fn check_ledger_everywhere(c: &Cluster, vd: &str, l: &Ledger) -> Result<()> {
    eprintln!(
        "{} writes acknowledged, {} failed, {} blocks checked",
        l.ok,
        l.failed,
        l.acked.len()
    );
    for i in 0..c.nodes.len() {
        let read = check_ledger(&c.block(i, vd)?, l);
        if let Err(e) = read {
            anyhow::bail!("reading through node index {i}: {e:#}\n{}", c.logs_tail());
        }
    }
    Ok(())
}

#[test]
fn writers_survive_kill9_of_a_replica_and_of_the_primary_rf2_rf3() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let size = 8 * MIB;
    let vds = [
        c.make_vdisk("two", 2, "a", size, 0)?,
        c.make_vdisk("three", 3, "b", size, 0)?,
    ];
    // Writers go through node 3, which is never killed; it forwards to the owner.
    let stop = Arc::new(AtomicBool::new(false));
    let ledgers: Vec<Arc<Mutex<Ledger>>> = vds.iter().map(|_| Arc::default()).collect();
    let writers: Vec<_> = vds
        .iter()
        .zip(&ledgers)
        .map(|(vd, l)| Ok(spawn_writer(c.block(2, vd)?, size, stop.clone(), l.clone())))
        .collect::<Result<_>>()?;
    let acked = |ls: &[Arc<Mutex<Ledger>>]| -> Vec<u64> {
        ls.iter().map(|l| l.lock().unwrap().ok).collect()
    };

    std::thread::sleep(Duration::from_secs(2));
    // A replica dies and comes back.
    c.kill9(1);
    std::thread::sleep(Duration::from_secs(3));
    c.spawn(1)?;
    std::thread::sleep(Duration::from_secs(3));
    let before = acked(&ledgers);
    assert!(
        before.iter().all(|n| *n > 20),
        "writers made no progress: {before:?}\n{}",
        c.logs_tail()
    );

    // The primary (owner of both vdisks) dies: ownership moves, writes resume.
    c.kill9(0);
    let t0 = Instant::now();
    let resumed = loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = acked(&ledgers);
        if now.iter().zip(&before).all(|(n, b)| *n > *b + 10) {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "writes did not resume after the primary died\n{}",
            c.logs_tail()
        );
    };
    eprintln!("writes resumed {resumed:?} after kill -9 of the primary");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    c.spawn(0)?;
    for (vd, l) in vds.iter().zip(&ledgers) {
        let l = l.lock().unwrap().clone();
        eprintln!(
            "vdisk {vd}: {} writes acknowledged, {} failed, {} blocks checked",
            l.ok,
            l.failed,
            l.acked.len()
        );
        check_ledger(&c.block(2, vd)?, &l)?;
        check_ledger(&c.block(1, vd)?, &l)?;
    }
    Ok(())
}

/// The owner of an RF2 vdisk, also the metadata leader, is cut off from
/// the other nodes while its host still reaches it and keeps writing. The
/// cut-off side must acknowledge nothing more (it can neither reach the
/// other replica nor drop it from the group without a metadata quorum);
/// the majority moves the vdisk and takes writes; after the heal, every
/// node reads the newest acknowledged data and nothing the old owner wrote
/// on its own resurfaces.
#[test]
fn a_partitioned_owner_acknowledges_nothing_the_majority_then_loses() -> Result<()> {
    partitioned_owner(false, 2)
}

/// [`a_partitioned_owner_acknowledges_nothing_the_majority_then_loses`]
/// with a one-way cut: the owner (and metadata leader) still sends to the
/// others but hears nothing back, so its heartbeats and replica writes
/// keep arriving for a while. RF3 here: the group has no node to go to but
/// the old owner's, so the old owner's copies, holding the writes it
/// appended alone while cut off, are brought current (caught up or copied
/// whole, never patched into a mix) and its disks alone then hold the live
/// vdisk.
#[test]
fn a_deafened_owner_acknowledges_nothing_the_majority_then_loses() -> Result<()> {
    partitioned_owner(true, 3)
}

fn partitioned_owner(one_way: bool, rf: u32) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let _g = serial();
    let c = Cluster::start_netns(3)?;
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let old = c.index_of(leader);
    let size = 8 * MIB;
    let ds = format!("rf{rf}");
    let vd = c.make_vdisk(&ds, rf, "p", size, old)?;
    let owner_seen_by = |i: usize| -> Option<u64> {
        let r = c.get(i, &format!("/v1/datastores/{ds}/vdisks/p")).ok()?;
        (r.status == 200).then(|| r.body["owner_node_id"].as_u64())?
    };
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let acked = || ledger.lock().unwrap().ok;

    // The old owner's host writes through it, before and during the cut.
    let stop_old = Arc::new(AtomicBool::new(false));
    let w_old = spawn_writer_from(
        c.block(old, &vd)?,
        size,
        stop_old.clone(),
        ledger.clone(),
        0,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        acked() > 20,
        "no progress before the cut\n{}",
        c.logs_tail()
    );

    if one_way {
        c.deafen(old)?;
    } else {
        c.partition(old)?;
    }
    let at_cut = acked();
    let t0 = Instant::now();
    let majority: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let new_owner = loop {
        if let Some(o) = owner_seen_by(majority[0]).filter(|o| *o != leader) {
            break o;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the majority did not move the vdisk\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "vdisk moved to node {new_owner} {:?} after the cut",
        t0.elapsed()
    );
    // The old side keeps trying for a while after the move.
    std::thread::sleep(Duration::from_secs(3));
    stop_old.store(true, Ordering::SeqCst);
    w_old.join().unwrap();
    let old_side = {
        let l = ledger.lock().unwrap();
        (l.ok - at_cut, l.failed)
    };
    eprintln!(
        "old owner: {} writes acknowledged before the cut, {} after it, {} failed",
        at_cut, old_side.0, old_side.1
    );
    // One write may have been past its replication when the cut fell.
    assert!(
        old_side.0 <= 1,
        "the cut-off owner acknowledged {} writes it could not replicate\n{}",
        old_side.0,
        c.logs_tail()
    );
    assert!(old_side.1 > 0, "the old owner's host saw no failure at all");

    // The majority's host writes the same blocks, through the heal.
    let stop_new = Arc::new(AtomicBool::new(false));
    let before = acked();
    let w_new = spawn_writer_from(
        c.block(majority[1], &vd)?,
        size,
        stop_new.clone(),
        ledger.clone(),
        1_000_000,
    );
    std::thread::sleep(Duration::from_secs(3));
    c.heal(old)?;
    std::thread::sleep(Duration::from_secs(4));
    stop_new.store(true, Ordering::SeqCst);
    w_new.join().unwrap();
    let l = ledger.lock().unwrap().clone();
    assert!(
        l.ok > before + 20,
        "the majority took too few writes: {} \n{}",
        l.ok - before,
        c.logs_tail()
    );
    // Every node, the old owner included, reads what was acknowledged last.
    check_ledger_everywhere(&c, &vd, &l)?;
    assert_eq!(
        owner_seen_by(old),
        Some(new_owner),
        "the old owner sees the move"
    );
    if rf == 3 {
        let took = wait_current_copy(&c, old, majority[0], &vd, size)?;
        let owner_at = (0..3).find(|i| c.nodes[*i].id == new_owner).unwrap_or(0);
        let (caught_up, whole, kib) = rebuild_tally(&c, owner_at)?;
        eprintln!(
            "the old owner holds a current copy {took:?} after the checks: \
             {caught_up} groups caught up ({kib} KiB), {whole} copied whole"
        );
    }
    Ok(())
}

/// A replica of an RF3 vdisk is cut off while the owner's host writes: the
/// owner drops it from its groups (writes stall for the replica timeout,
/// then resume on the two left), and after the heal the same node, still
/// running with its stale files, is brought back to a full, current copy.
#[test]
fn a_partitioned_replica_is_dropped_then_comes_back_current() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let _g = serial();
    let c = Cluster::start_netns(3)?;
    let leader = c.index_of(c.wait_leader(Duration::from_secs(10))?);
    let owner = (leader + 1) % 3;
    let cut = (leader + 2) % 3;
    let size = 8 * MIB;
    let vd = c.make_vdisk("three", 3, "r", size, owner)?;
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let acked = || ledger.lock().unwrap().ok;
    let stop = Arc::new(AtomicBool::new(false));
    let w = spawn_writer(c.block(owner, &vd)?, size, stop.clone(), ledger.clone());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        acked() > 20,
        "no progress before the cut\n{}",
        c.logs_tail()
    );

    c.partition(cut)?;
    let (at_cut, t0) = (acked(), Instant::now());
    while acked() < at_cut + 50 {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "writes did not resume without the cut-off replica\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("writes resumed {:?} after the cut", t0.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    c.heal(cut)?;
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let l = ledger.lock().unwrap().clone();
    check_ledger_everywhere(&c, &vd, &l)?;

    // The node that was cut off ends up with a whole, current copy.
    let took = wait_current_copy(&c, cut, owner, &vd, size)?;
    eprintln!("the cut-off node holds a current copy {took:?} after the heal");
    // It got there by catching up: only the writes it missed were copied,
    // never a whole group (the owner's rebuild tasks say which).
    let (caught_up, whole, _) = rebuild_tally(&c, owner)?;
    assert!(
        caught_up > 0 && whole == 0,
        "{caught_up} groups caught up, {whole} copied whole\n{}",
        c.logs_tail()
    );
    Ok(())
}

/// Waits until the image exported from node index `i`'s disks alone equals
/// the live vdisk (read through node index `via`); returns how long.
fn wait_current_copy(
    c: &Cluster,
    i: usize,
    via: usize,
    vd: &str,
    size: u64,
) -> Result<std::time::Duration> {
    use std::time::{Duration, Instant};
    let live = c.block(via, vd)?.read(0, size)?;
    let img = c.root.path().join(format!("node-{i}-alone.img"));
    let (img_s, dir) = (
        img.display().to_string(),
        c.nodes[i].dir.join("disks").display().to_string(),
    );
    let t0 = Instant::now();
    loop {
        let exported = c
            .cli_ok(&["extent", "export", "--vdisk", vd, "-o", &img_s, &dir])
            .ok()
            .and_then(|_| std::fs::read(&img).ok());
        if exported.as_deref() == Some(&live[..]) {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "node index {i} never got a current copy back\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// What node index `i`'s finished rebuild tasks did: groups caught up,
/// groups copied whole, and KiB of missed writes the catch-ups copied
/// (their message: "N caught up (K KiB missed), M copied whole (L KiB); D
/// replica(s) dropped", failed passes included).
fn rebuild_tally(c: &Cluster, i: usize) -> Result<(u64, u64, u64)> {
    let r = c.get(i, "/v1/tasks")?;
    let node = c.nodes[i].id;
    let mut sum = (0, 0, 0);
    for t in r.body.as_array().into_iter().flatten() {
        if t["kind"] != "rebuild" || t["state"] == "running" || t["node_id"] != node {
            continue;
        }
        let msg = t["message"].as_str().unwrap_or_default();
        // The number just before `what`.
        let count = |what: &str| -> Result<u64> {
            let before = msg
                .split(what)
                .next()
                .filter(|b| b.len() < msg.len())
                .ok_or_else(|| anyhow::anyhow!("task message without {what:?}: {msg}"))?;
            let n = before
                .rsplit(|ch: char| !ch.is_ascii_digit())
                .find(|w| !w.is_empty());
            n.unwrap_or_default()
                .parse()
                .map_err(|e| anyhow::anyhow!("{msg}: {e}"))
        };
        sum.0 += count(" caught up")?;
        sum.1 += count(" copied whole")?;
        sum.2 += count(" KiB missed")?;
    }
    Ok(sum)
}

/// Node index 0's newest task of kind `rebuild-wait` in `state`.
fn wait_task(c: &Cluster, state: &str) -> Result<Option<serde_json::Value>> {
    let r = c.get(0, "/v1/tasks")?;
    Ok(r.body.as_array().and_then(|ts| {
        ts.iter()
            .rev()
            .find(|t| t["kind"] == "rebuild-wait" && t["state"] == state)
            .cloned()
    }))
}

/// A planned restart: the node of replicas of an RF3 and an RF2 vdisk is
/// away long enough to be found dead (its replicas dropped from every
/// group) while the host writes ten blocks to each and unmaps one, then
/// comes back with its files. The RF2 groups wait for it rather than being
/// rebuilt on the third node, and it is brought current by copying only
/// what it missed (BRIEF: a maintenance restart is a catch-up, not a
/// rebuild): the image exported from its disks alone equals the live RF3
/// vdisk.
#[test]
fn a_restarted_replica_catches_up_only_the_writes_it_missed() -> Result<()> {
    use std::time::{Duration, Instant};
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let size = 16 * MIB;
    let vds = [
        c.make_vdisk("three", 3, "m", size, 0)?,
        c.make_vdisk("two", 2, "n", size, 0)?,
    ];
    let ios = [c.block(0, &vds[0])?, c.block(0, &vds[1])?];
    for io in &ios {
        write_all_blocks(io, size, 1)?;
    }
    let dirs: Vec<PathBuf> = c.disk_dirs();
    let files = |i: usize| extent_files(&dirs[i]).len();
    let (on_1, on_2) = (files(1), files(2));
    c.kill9(2);
    let missed: Vec<u64> = (0..10u64)
        .map(|k| k * 3 * MIB / 2 + (k * 37 % 256) * BS as u64)
        .collect();
    for io in &ios {
        for &off in &missed {
            io.write(off, &block(off, 2))?;
        }
    }
    let trimmed = 15 * MIB + 5 * BS as u64;
    ios[0].unmap(trimmed, BS as u64)?;
    // Dead after 5 s of silence: every group drops it, and waits for it
    // in a task the operator sees.
    std::thread::sleep(Duration::from_secs(10));
    let waiting = wait_task(&c, "running")?
        .ok_or_else(|| anyhow::anyhow!("no running rebuild-wait task\n{}", c.logs_tail()))?;
    let desc = waiting["description"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        desc.contains(&format!("{on_2} extent group(s)"))
            && desc.contains(&c.nodes[2].id.to_string()),
        "{waiting}"
    );
    c.spawn(2)?;

    // Every group it held is caught up (none copied whole, none rebuilt on
    // node index 1).
    let t0 = Instant::now();
    let (caught_up, whole, kib) = loop {
        let t = rebuild_tally(&c, 0)?;
        if t.0 + t.1 >= on_2 as u64 {
            break t;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "{t:?}: not every group of the node came back\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "{caught_up} groups caught up with {kib} KiB, {whole} copied whole, {:?} after the start",
        t0.elapsed()
    );
    let rf3_kib = missed.len() as u64 * 4;
    assert!(
        caught_up == on_2 as u64 && whole == 0 && (rf3_kib..=2 * rf3_kib).contains(&kib),
        "{caught_up} of {on_2} groups caught up with {kib} KiB, {whole} copied whole\n{}",
        c.logs_tail()
    );
    assert_eq!(files(1), on_1, "groups were rebuilt on the third node");
    let t1 = Instant::now();
    while wait_task(&c, "done")?.is_none() {
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(20),
            "the rebuild-wait task never ended\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = wait_current_copy(&c, 2, 0, &vds[0], size)?;
    eprintln!("the restarted node holds a current RF3 copy {took:?} later");
    let others = [c.block(1, &vds[1])?, c.block(2, &vds[0])?];
    for io in &others {
        for &off in &missed {
            check_block(&io.read(off, BS as u64)?, off, 2);
        }
    }
    assert_eq!(ios[0].read(trimmed, BS as u64)?, vec![0u8; BS]);
    on_all_disks(&c, &["extent", "verify"])?;
    Ok(())
}

/// A 3-node cluster whose nodes wait `wait` for an away replica's node
/// (`[data] rebuild_wait_secs`), with an RF2 vdisk of `size` owned by node
/// index 0 and written whole: the cluster, the vdisk, its data and how
/// many groups node index 2 holds a replica of (at least one).
fn rf2_with_rebuild_wait(
    wait: std::time::Duration,
    name: &str,
    size: u64,
    gen: u64,
) -> Result<(Cluster, String, Vec<u8>, u64)> {
    let mut c = Cluster::start(3)?;
    for i in 0..3 {
        c.set_config(
            i,
            "data",
            &format!("rebuild_wait_secs = {}", wait.as_secs()),
        )?;
        c.stop(i)?;
        c.spawn(i)?;
    }
    c.wait_leader(std::time::Duration::from_secs(30))?;
    let vd = c.make_vdisk("two", 2, name, size, 0)?;
    let data = write_all_blocks(&c.block(0, &vd)?, size, gen)?;
    let on_2 = extent_files(&c.nodes[2].dir.join("disks")).len() as u64;
    anyhow::ensure!(on_2 > 0, "node index 2 holds no replica");
    Ok((c, vd, data, on_2))
}

/// Waits (up to 90 s) until node index 0's finished rebuild tasks count
/// `groups` copied whole; returns their (caught up, copied whole) counts.
fn wait_copied_whole(c: &Cluster, groups: u64, what: &str) -> Result<(u64, u64)> {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    loop {
        let (caught_up, whole, _) = rebuild_tally(c, 0)?;
        if whole >= groups {
            return Ok((caught_up, whole));
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(90),
            "{whole} of {groups} groups rebuilt {what}\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A node that does not come back within `[data] rebuild_wait_secs`: the
/// RF2 groups that held a replica there wait out the wait, then are
/// rebuilt whole on the third node, and every block reads back.
#[test]
fn groups_whose_node_stays_away_are_rebuilt_elsewhere_after_the_wait() -> Result<()> {
    use std::time::{Duration, Instant};
    let _g = serial();
    let wait = Duration::from_secs(8);
    let size = 8 * MIB;
    let (mut c, vd, data, on_2) = rf2_with_rebuild_wait(wait, "w", size, 3)?;
    c.kill9(2);
    let t0 = Instant::now();
    let (caught_up, _) = wait_copied_whole(&c, on_2, "after the kill")?;
    assert_eq!(caught_up, 0);
    let took = t0.elapsed();
    eprintln!("{on_2} groups rebuilt on the third node {took:?} after the kill");
    // Dropped once found dead (5 s), then waited for.
    assert!(took >= wait, "rebuilt after {took:?}, within the wait");
    assert!(
        c.block(1, &vd)?.read(0, size)? == data,
        "data differs after the rebuild"
    );
    on_all_disks(&c, &["extent", "verify"])?;
    Ok(())
}

/// A node announced for maintenance (`cairn node maintenance start`) is
/// waited for past the rebuild wait: its groups run with a replica fewer
/// and are not rebuilt elsewhere. Once the mark ends they are. Bad marks
/// are refused with a problem document.
#[test]
fn groups_wait_for_a_node_in_maintenance_past_the_rebuild_wait() -> Result<()> {
    use std::time::{Duration, Instant};
    let _g = serial();
    let size = 8 * MIB;
    let (mut c, vd, data, on_2) = rf2_with_rebuild_wait(Duration::from_secs(3), "m", size, 5)?;
    let id = c.nodes[2].id.to_string();
    let path = format!("/v1/nodes/{id}/maintenance");

    for (body, why) in [
        (json!({ "duration_secs": 0 }), "zero duration"),
        (json!({ "duration_secs": 8 * 86_400 }), "over 7 days"),
        (
            json!({ "duration_secs": 60, "reason": "x".repeat(300) }),
            "long reason",
        ),
        (json!({ "duration_secs": 60, "until": 5 }), "unknown field"),
    ] {
        let r = c.request(0, "PUT", &path, Some(&body))?;
        assert!(
            r.status == 422 || r.status == 400,
            "{why}: {} {}",
            r.status,
            r.body
        );
    }
    let r = c.request(
        0,
        "PUT",
        "/v1/nodes/99/maintenance",
        Some(&json!({ "duration_secs": 60 })),
    )?;
    assert_eq!(r.status, 404, "{}", r.body);

    let dir = c.nodes[0].dir.display().to_string();
    let cli = |c: &Cluster, args: &[&str]| -> Result<String> {
        let mut all = vec!["--data-dir", dir.as_str()];
        all.extend_from_slice(args);
        c.cli_ok(&all)
    };
    cli(
        &c,
        &[
            "node",
            "maintenance",
            "start",
            &id,
            "--for",
            "10m",
            "--reason",
            "kernel upgrade",
        ],
    )?;
    let listed = cli(&c, &["node", "list"])?;
    assert!(
        listed.contains("ends in 9m") || listed.contains("ends in 10m"),
        "no maintenance in the node list:\n{listed}"
    );
    assert!(listed.contains("(kernel upgrade)"), "{listed}");
    let nodes = c.get(1, "/v1/nodes")?.body;
    let mark = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == c.nodes[2].id))
        .map(|n| n["maintenance"].clone())
        .unwrap_or_default();
    assert_eq!(mark["reason"], "kernel upgrade", "{nodes}");

    c.kill9(2);
    // Found dead after 5 s and dropped, then the 3 s wait: well past it,
    // nothing may have been rebuilt.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(18) {
        let (caught_up, whole, _) = rebuild_tally(&c, 0)?;
        assert_eq!(
            (caught_up, whole),
            (0, 0),
            "rebuilt while its node is in maintenance\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let task = wait_task(&c, "running")?
        .ok_or_else(|| anyhow::anyhow!("no running rebuild-wait task\n{}", c.logs_tail()))?;
    let msg = task["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("node {id} for")),
        "the wait task does not name the maintenance: {task}"
    );
    assert!(
        c.block(1, &vd)?.read(0, size)? == data,
        "data differs while a replica is away"
    );

    cli(&c, &["node", "maintenance", "end", &id])?;
    let t1 = Instant::now();
    wait_copied_whole(&c, on_2, "after the maintenance ended")?;
    eprintln!(
        "{on_2} groups rebuilt {:?} after the maintenance ended",
        t1.elapsed()
    );
    assert!(
        c.block(1, &vd)?.read(0, size)? == data,
        "data differs after the rebuild"
    );
    Ok(())
}

/// `cairn node maintenance start --wait` drains the node (the metadata
/// leader's) while it still runs: the RF2 vdisk it owns moves to another
/// node (owner epoch + 1, under a host's writes through a third node), the
/// RF1 one whose only copy is there stays and the drain task names it, new
/// extent groups go to other nodes, and raft leadership moves to another
/// voter. Killed after that, the node costs the moved vdisk no failover
/// (its owner epoch does not change again), its writes go on, and no
/// acknowledged write is lost.
#[test]
fn a_node_in_maintenance_is_drained_before_it_stops() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    // The drained node m, the host's node h, and a third one t.
    let m = c.index_of(leader);
    let (h, t) = ((m + 1) % 3, (m + 2) % 3);
    let half = 8 * MIB;
    let rf2 = c.make_vdisk("two", 2, "d", 2 * half, m)?;
    let rf1 = c.make_vdisk("one", 1, "s", MIB, m)?;
    write_all_blocks(&c.block(h, &rf1)?, MIB, 1)?;
    let io = c.block(h, &rf2)?;
    write_all_blocks(&io, half, 1)?;
    let owner = |c: &Cluster, ds: &str, name: &str| -> Result<(u64, u64)> {
        let r = c.get(h, &format!("/v1/datastores/{ds}/vdisks/{name}"))?;
        anyhow::ensure!(r.status == 200, "{} {}", r.status, r.body);
        Ok((
            r.body["owner_node_id"].as_u64().unwrap_or_default(),
            r.body["owner_epoch"].as_u64().unwrap_or_default(),
        ))
    };
    let id = c.nodes[m].id;
    let (was, epoch) = owner(&c, "two", "d")?;
    assert_eq!(was, id);

    // A host writes the first half through node h from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let w = spawn_writer_from(c.block(h, &rf2)?, half, stop.clone(), ledger.clone(), 1);
    std::thread::sleep(Duration::from_secs(2));

    let dir = c.nodes[h].dir.display().to_string();
    let out = c.cli_ok(&[
        "--data-dir",
        &dir,
        "node",
        "maintenance",
        "start",
        &id.to_string(),
        "--for",
        "10m",
        "--reason",
        "disk swap",
        "--wait",
    ])?;
    assert!(
        out.contains("drain") && out.contains("done") && out.contains("s (every copy"),
        "the CLI did not show the drain and what stays:\n{out}"
    );
    let (now_owner, now_epoch) = owner(&c, "two", "d")?;
    assert!(
        now_owner != id && now_epoch == epoch + 1,
        "the RF2 vdisk was not moved off the node: owner {now_owner}, epoch {now_epoch}\n{}",
        c.logs_tail()
    );
    assert_eq!(owner(&c, "one", "s")?.0, id, "the RF1 vdisk moved");
    let nodes = c.get(h, "/v1/nodes")?.body;
    let task_id = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == id))
        .and_then(|n| n["maintenance"]["drain_task"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no drain task in {nodes}"))?;
    let task = c.get(t, &format!("/v1/tasks/{task_id}"))?.body;
    assert!(
        task["kind"] == "drain"
            && task["state"] == "done"
            && task["node_id"] == id
            && task["done_bytes"] == 2 * half
            && task["message"]
                .as_str()
                .is_some_and(|m| m.contains("1 vdisk(s) stay")),
        "{task}"
    );

    // Raft leadership moved off the node (asked in the drain's passes).
    let t0 = std::time::Instant::now();
    while c.leader().is_none_or(|l| l == id) {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "the node in maintenance still leads the metadata\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // New groups (the second half) have no replica on the drained node.
    let on_m = extent_files(&c.nodes[m].dir.join("disks")).len();
    let upper = c.block(t, &rf2)?;
    for k in 0..8 {
        let off = half + k * MIB;
        upper.write(off, &block(off, 7))?;
    }
    assert_eq!(
        extent_files(&c.nodes[m].dir.join("disks")).len(),
        on_m,
        "a new extent group was placed on the node in maintenance"
    );

    let before_kill = ledger.lock().unwrap().ok;
    c.kill9(m);
    // Past DEAD_AFTER (5 s): a failover would have happened by now.
    std::thread::sleep(Duration::from_secs(9));
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer");
    let l = ledger.lock().unwrap().clone();
    eprintln!(
        "{} writes acknowledged after the kill, {} failed in all",
        l.ok - before_kill,
        l.failed
    );
    assert!(l.ok - before_kill > 20, "writes stopped after the kill");
    assert_eq!(
        owner(&c, "two", "d")?,
        (now_owner, now_epoch),
        "the moved vdisk failed over again"
    );
    for i in [h, t] {
        check_ledger(&c.block(i, &rf2)?, &l)?;
        let upper = c.block(i, &rf2)?;
        for k in 0..8 {
            let off = half + k * MIB;
            check_block(&upper.read(off, BS as u64)?, off, 7);
        }
    }
    Ok(())
}

/// The owner of an RF2 vdisk restarts while a replica's node is away
/// (dropped from the groups it held): the groups keep waiting for that
/// node, as the away marks in metadata say, instead of being copied whole
/// to the third node the moment the owner is back; when the node returns
/// they are caught up.
#[test]
fn an_owner_that_restarts_keeps_waiting_for_an_away_node() -> Result<()> {
    use std::time::{Duration, Instant};
    let _g = serial();
    let size = 8 * MIB;
    let (mut c, vd, data, on_2) = rf2_with_rebuild_wait(Duration::from_secs(60), "o", size, 9)?;
    c.kill9(2);
    // Found dead after ~5 s and dropped from its groups: they wait.
    let t0 = Instant::now();
    while wait_task(&c, "running")?.is_none() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "no rebuild-wait task after the kill\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let dropped = Instant::now();
    c.kill9(0);
    c.spawn(0)?;
    c.wait_leader(Duration::from_secs(30))?;
    // Several monitor passes of the restarted owner, still well inside the
    // 60 s wait: nothing may be copied to the third node.
    while dropped.elapsed() < Duration::from_secs(35) {
        let (caught_up, whole, _) = rebuild_tally(&c, 0)?;
        assert_eq!(
            (caught_up, whole),
            (0, 0),
            "rebuilt by the restarted owner inside the wait\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        c.block(0, &vd)?.read(0, size)? == data,
        "data differs after the owner's restart"
    );
    c.spawn(2)?;
    let t1 = Instant::now();
    loop {
        let (caught_up, whole, _) = rebuild_tally(&c, 0)?;
        assert_eq!(whole, 0, "copied whole instead of caught up");
        if caught_up >= on_2 {
            break;
        }
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(60),
            "{caught_up} of {on_2} groups caught up after the node came back\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        c.block(1, &vd)?.read(0, size)? == data,
        "data differs after the catch-up"
    );
    // The wait task of the owner's first run was closed by its second, and
    // the second's once nothing waited: none is left running.
    let t2 = Instant::now();
    while let Some(t) = wait_task(&c, "running")? {
        anyhow::ensure!(
            t2.elapsed() < Duration::from_secs(20),
            "a rebuild-wait task still running after the catch-up: {t}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// Partitions that come and go: the owner of an RF2 vdisk and then a
/// replica holder are cut off and healed, again and again, faster than a
/// rebuild finishes, while a host writes through the one node never cut
/// off. Every acknowledged write must be read back through every node at
/// the end, and writes must flow again once the network is whole.
#[test]
fn flapping_partitions_lose_no_acknowledged_write() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let _g = serial();
    let c = Cluster::start_netns(3)?;
    let size = 8 * MIB;
    let vd = c.make_vdisk("two", 2, "f", size, 0)?;
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let acked = || ledger.lock().unwrap().ok;
    let stop = Arc::new(AtomicBool::new(false));
    let w = spawn_writer(c.block(2, &vd)?, size, stop.clone(), ledger.clone());
    std::thread::sleep(Duration::from_secs(2));
    for (round, victim) in [0usize, 1, 0, 1].into_iter().enumerate() {
        c.partition(victim)?;
        std::thread::sleep(Duration::from_secs(7));
        c.heal(victim)?;
        std::thread::sleep(Duration::from_secs(4));
        eprintln!(
            "round {round}: node index {victim} cut 7 s, healed; {} acknowledged",
            acked()
        );
    }
    // Whole again: writes must flow.
    let (n0, t0) = (acked(), Instant::now());
    while acked() < n0 + 100 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "writes did not resume once the network was whole\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let l = ledger.lock().unwrap().clone();
    check_ledger_everywhere(&c, &vd, &l)?;
    Ok(())
}

#[test]
fn wiped_node_is_rebuilt_to_full_replication() -> Result<()> {
    use std::time::{Duration, Instant};
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let size = 24 * MIB;
    let vd = c.make_vdisk("two", 2, "w", size, 0)?;
    let io = c.block(0, &vd)?;
    let data = write_all_blocks(&io, size, 7)?;
    let groups = extent_files(&c.nodes[0].dir.join("disks")).len();
    assert_eq!(groups, 24);

    // The other node with the most replicas loses everything: its disks
    // are wiped while it is down.
    let victim = if extent_files(&c.nodes[1].dir.join("disks")).len()
        >= extent_files(&c.nodes[2].dir.join("disks")).len()
    {
        1
    } else {
        2
    };
    let lost = extent_files(&c.nodes[victim].dir.join("disks")).len();
    assert!(lost > 0);
    c.kill9(victim);
    std::fs::remove_dir_all(c.nodes[victim].dir.join("disks"))?;
    c.spawn(victim)?;

    // A rebuild task appears and reaches 100 %.
    let t0 = Instant::now();
    let task = loop {
        let r = c.get(0, "/v1/tasks")?;
        let done = r.body.as_array().and_then(|ts| {
            ts.iter()
                .rev()
                .find(|t| t["kind"] == "rebuild" && t["state"] == "done")
                .cloned()
        });
        if let Some(t) = done {
            // Later passes may still find work; wait until RF holds everywhere.
            let total: usize = c
                .nodes
                .iter()
                .map(|n| extent_files(&n.dir.join("disks")).len())
                .sum();
            if total == 2 * groups {
                break t;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "rebuild did not finish\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(task["percent"].as_f64(), Some(100.0), "{task}");
    let watch = c.cli_ok(
        &[
            &c.conn_args(0)[..],
            &[
                "task".to_string(),
                "watch".to_string(),
                task["id"].as_str().unwrap().to_string(),
            ],
        ]
        .concat()
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )?;
    assert!(watch.contains("100.0%"), "{watch}");
    eprintln!("rebuild task {} done in {:?}", task["id"], t0.elapsed());

    // Every byte still reads back, and every replica verifies.
    assert!(io.read(0, size)? == data, "data differs after the rebuild");
    on_all_disks(&c, &["extent", "verify"])?;
    Ok(())
}

#[test]
fn snapshot_overwrite_clone_each_see_their_data() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(3)?;
    let size = 4 * MIB;
    let vd = c.make_vdisk("snaps", 2, "base", size, 0)?;
    let io = c.block(1, &vd)?;
    let v1: Vec<u8> = (0..size / BS as u64)
        .flat_map(|b| block(b * BS as u64, 1))
        .collect();
    io.write(0, &v1)?;

    let r = c.post(
        0,
        "/v1/datastores/snaps/vdisks/base/snapshots",
        &serde_json::json!({"name": "s1"}),
    )?;
    assert_eq!(r.status, 201, "{}", r.body);
    let gen1 = r.body["generation"].as_u64().unwrap();

    // Overwrite part of the vdisk (4 KiB inside one vblock, 1 MiB over another) and trim a third.
    io.write(8 * BS as u64, &block(8 * BS as u64, 2))?;
    let over: Vec<u8> = (0..256u64)
        .flat_map(|b| block(2 * MIB + b * BS as u64, 2))
        .collect();
    io.write(2 * MIB, &over)?;
    io.unmap(3 * MIB, MIB)?;
    let mut v2 = v1.clone();
    v2[8 * BS..9 * BS].copy_from_slice(&block(8 * BS as u64, 2));
    v2[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&over);
    v2[3 * MIB as usize..].fill(0);
    assert!(
        io.read(0, size)? == v2,
        "live vdisk does not show the overwrite"
    );

    // The clone shows the snapshot, not the overwrite; writes to it stay its own.
    let r = c.post(
        0,
        "/v1/datastores/snaps/vdisks/base/snapshots/s1/clone",
        &serde_json::json!({"name": "copy", "owner_node_id": c.nodes[2].id}),
    )?;
    assert_eq!(r.status, 201, "{}", r.body);
    let clone_id = r.body["id"].as_str().unwrap().to_string();
    let cl = c.block(0, &clone_id)?;
    assert!(
        cl.read(0, size)? == v1,
        "clone does not show the snapshot's data"
    );
    cl.write(0, &block(0, 9))?;
    let mut v3 = v1.clone();
    v3[..BS].copy_from_slice(&block(0, 9));
    assert!(cl.read(0, size)? == v3, "clone lost its own write");
    assert!(
        io.read(0, size)? == v2,
        "a write to the clone changed the parent"
    );

    // Offline: the snapshot's generation exports the snapshot's bytes.
    let img = c.root.path().join("snap.img").display().to_string();
    let g = gen1.to_string();
    let export = ["extent", "export", "--vdisk"];
    on_all_disks(
        &c,
        &[
            &export[..],
            &[vd.as_str(), "--generation", g.as_str(), "-o", img.as_str()],
        ]
        .concat(),
    )?;
    assert!(std::fs::read(&img)? == v1, "exported snapshot differs");
    on_all_disks(
        &c,
        &[&export[..], &[clone_id.as_str(), "-o", img.as_str()]].concat(),
    )?;
    assert!(std::fs::read(&img)? == v3, "exported clone differs");

    // The snapshot cannot go while the clone needs it; once the clone is
    // gone, deleting it frees the overwritten versions.
    let r = c.client(0).request(
        "DELETE",
        "/v1/datastores/snaps/vdisks/base/snapshots/s1",
        None,
    )?;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = c
        .client(0)
        .request("DELETE", "/v1/datastores/snaps/vdisks/copy", None)?;
    assert_eq!(r.status, 204, "{}", r.body);
    let before: usize = c
        .nodes
        .iter()
        .map(|n| extent_files(&n.dir.join("disks")).len())
        .sum();
    let r = c.client(0).request(
        "DELETE",
        "/v1/datastores/snaps/vdisks/base/snapshots/s1",
        None,
    )?;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        io.read(0, size)? == v2,
        "deleting the snapshot changed the live vdisk"
    );
    // Orphaned replica files are collected after their grace period.
    let t0 = std::time::Instant::now();
    loop {
        let now: usize = c
            .nodes
            .iter()
            .map(|n| extent_files(&n.dir.join("disks")).len())
            .sum();
        if now < before {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no space freed: {before} files"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    Ok(())
}

/// A small ext4 file system on a loop device, unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
    img: PathBuf,
}

impl LoopFs {
    fn new(img: PathBuf, mnt: PathBuf, mib: u64) -> Result<Self> {
        let f = std::fs::File::create(&img)?;
        f.set_len(mib * MIB)?;
        drop(f);
        cairn_tests::sh_ok("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()])?;
        std::fs::create_dir_all(&mnt)?;
        cairn_tests::sh_ok(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        )?;
        Ok(Self { mnt, img })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
        let _ = std::fs::remove_file(&self.img);
    }
}

#[test]
fn full_disk_fails_over_or_gives_a_clear_error_and_loses_nothing() -> Result<()> {
    let _g = serial();
    let mut c = Cluster::start(3)?;
    // Node 3's only disk becomes a 48 MiB ext4 file system.
    c.stop(2)?;
    let d0 = c.nodes[2].dir.join("disks/d0");
    std::fs::remove_dir_all(&d0)?;
    let _fs = LoopFs::new(c.root.path().join("small.img"), d0.clone(), 48)?;
    c.spawn(2)?;
    std::thread::sleep(std::time::Duration::from_secs(2));

    // An RF1 vdisk on node 3 gets one block while there is room.
    let one = c.make_vdisk("one", 1, "r1", 8 * MIB, 2)?;
    let io1 = c.block(2, &one)?;
    io1.write(0, &block(0, 1))?;
    // An RF2 vdisk owned by node 3 is filled far past its disk's size.
    let two = c.make_vdisk("two", 2, "r2", 96 * MIB, 2)?;
    let io2 = c.block(2, &two)?;
    let mut written = 0u64;
    for chunk in 0..80u64 {
        let data: Vec<u8> = (0..256u64)
            .flat_map(|b| block(chunk * MIB + b * BS as u64, 5))
            .collect();
        io2.write(chunk * MIB, &data).map_err(|e| {
            anyhow::anyhow!(
                "RF2 write {chunk} failed (should fail over): {e}\n{}",
                c.logs_tail()
            )
        })?;
        written += MIB;
    }
    assert_eq!(written, 80 * MIB);
    let log = c.nodes[2].log();
    assert!(
        log.contains("disk is full; taken out of placement") || log.contains("no space"),
        "{}",
        c.logs_tail()
    );

    // Something else takes the last free bytes of the file system.
    {
        use std::io::Write as _;
        let mut filler = std::fs::File::create(d0.join("filler"))?;
        let chunk = vec![0xEEu8; 64 * 1024];
        while filler.write_all(&chunk).is_ok() {}
        let _ = filler.sync_all();
    }
    // Overwriting the RF1 block needs space that is not there: a clear error...
    let mut full_err = None;
    for i in 0..64u64 {
        let data: Vec<u8> = (0..256u64)
            .flat_map(|b| block(b * BS as u64, 10 + i))
            .collect();
        if let Err(e) = io1.write(0, &data[..]) {
            full_err = Some(e.to_string());
            break;
        }
    }
    let e = full_err.expect("writes into a full disk's only replica kept succeeding");
    assert!(e.contains("no space left"), "unclear error: {e}");

    // ...and nothing acknowledged is lost, on either vdisk.
    let got = io1.read(0, BS as u64)?;
    let g = u64::from_le_bytes(got[8..16].try_into().unwrap());
    assert!(g >= 1, "RF1 block lost");
    for chunk in 0..80u64 {
        let got = io2.read(chunk * MIB, MIB)?;
        for b in 0..256u64 {
            let at = (b as usize) * BS;
            check_block(&got[at..at + BS], chunk * MIB + b * BS as u64, 5);
        }
    }
    c.stop(2)?;
    Ok(())
}

#[test]
fn corrupt_header_truncation_and_eio_are_survived_and_repaired() -> Result<()> {
    use std::time::{Duration, Instant};
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let size = 8 * MIB;
    let vd = c.make_vdisk("two", 2, "f", size, 0)?;
    let io = c.block(0, &vd)?;
    let v1: Vec<u8> = (0..size / BS as u64)
        .flat_map(|b| block(b * BS as u64, 1))
        .collect();
    io.write(0, &v1)?;
    let count = |c: &Cluster| -> usize {
        c.nodes
            .iter()
            .map(|n| extent_files(&n.dir.join("disks")).len())
            .sum()
    };
    assert_eq!(count(&c), 16);

    // On a stopped non-owner: one file gets a corrupt superblock, another is
    // truncated into its first record (it loses acknowledged writes).
    let victim = if extent_files(&c.nodes[1].dir.join("disks")).len() >= 3 {
        1
    } else {
        2
    };
    c.stop(victim)?;
    let files = extent_files(&c.nodes[victim].dir.join("disks"));
    assert!(files.len() >= 3, "{files:?}");
    let f0 = std::fs::OpenOptions::new().write(true).open(&files[0])?;
    f0.write_all_at(b"XXXX", 20)?;
    let f1 = std::fs::OpenOptions::new().write(true).open(&files[1])?;
    f1.set_len(4096 + 100)?;
    drop((f0, f1));
    let offline = c.cli(&["extent", "inspect", files[0].to_str().unwrap()])?;
    assert!(!offline.status.success());
    let msg = String::from_utf8_lossy(&offline.stderr).to_string();
    assert!(
        msg.contains(files[0].file_name().unwrap().to_str().unwrap()),
        "error does not name the file: {msg}"
    );
    c.spawn(victim)?;
    let log_has = |c: &Cluster, s: &str| c.nodes[victim].log().contains(s);
    let t0 = Instant::now();
    while !log_has(&c, "cannot open extent group file") {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", c.logs_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Reads stay correct throughout, and RF is restored with verified copies.
    assert!(io.read(0, size)? == v1);
    let t0 = Instant::now();
    loop {
        let verified = on_all_disks(&c, &["extent", "verify"]).is_ok();
        if verified && count(&c) == 16 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "replicas not repaired\n{}",
            c.logs_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // EIO on the owner's disk: its writes fail over to the other replicas.
    std::fs::write(c.nodes[0].dir.join("disks/d0").join("FAULT-EIO"), b"")?;
    std::thread::sleep(Duration::from_millis(300));
    let v2: Vec<u8> = (0..size / BS as u64)
        .flat_map(|b| block(b * BS as u64, 2))
        .collect();
    io.write(0, &v2)
        .map_err(|e| anyhow::anyhow!("write with a failing local disk: {e}\n{}", c.logs_tail()))?;
    assert!(io.read(0, size)? == v2, "data after EIO failover differs");
    assert!(c.nodes[0]
        .log()
        .contains("disk I/O error; taken out of placement"));
    std::fs::remove_file(c.nodes[0].dir.join("disks/d0").join("FAULT-EIO"))?;
    Ok(())
}

/// What a power-loss test wrote: every generation of each block, and the
/// newest one a flush covered.
struct History {
    written: Vec<Vec<u64>>,
    flushed: Vec<u64>,
}

/// Fills the vdisk with generation 1 and flushes, then three rounds of 150
/// random cached writes of 1-8 blocks each followed by a flush, then 150
/// more that no flush covers.
fn write_history(
    io: &cairn_tests::BlockClient,
    size: u64,
    rng: &mut impl rand::Rng,
) -> Result<History> {
    let blocks = size / BS as u64;
    let mut h = History {
        written: vec![vec![1]; blocks as usize],
        flushed: vec![1; blocks as usize],
    };
    for chunk in 0..size / MIB {
        let data: Vec<u8> = (0..MIB / BS as u64)
            .flat_map(|b| block(chunk * MIB + b * BS as u64, 1))
            .collect();
        io.write_cached(chunk * MIB, &data)?;
    }
    io.flush()?;
    let mut gen = 1;
    for phase in 0..4 {
        for _ in 0..150 {
            gen += 1;
            let first = rng.gen_range(0..blocks);
            let count = rng.gen_range(1..=8).min(blocks - first);
            let data: Vec<u8> = (first..first + count)
                .flat_map(|b| block(b * BS as u64, gen))
                .collect();
            io.write_cached(first * BS as u64, &data)?;
            for b in first..first + count {
                h.written[b as usize].push(gen);
            }
        }
        if phase < 3 {
            io.flush()?;
            for (f, w) in h.flushed.iter_mut().zip(&h.written) {
                *f = *w.last().unwrap();
            }
        }
    }
    Ok(h)
}

/// Waits for the vdisk to serve, then checks every block against `h`: a
/// generation that was written, at least the flushed one, never an error.
fn check_history(c: &Cluster, vd: &str, size: u64, h: &History) -> Result<Vec<u8>> {
    check_history_via(c, 0, vd, size, h)
}

/// [`check_history`] through node `via`; returns what it read.
fn check_history_via(c: &Cluster, via: usize, vd: &str, size: u64, h: &History) -> Result<Vec<u8>> {
    use std::time::{Duration, Instant};
    let io = c.block(via, vd)?;
    let t0 = Instant::now();
    while io.read(0, BS as u64).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", c.logs_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = io
        .read(0, size)
        .map_err(|e| anyhow::anyhow!("read after the power loss: {e}\n{}", c.logs_tail()))?;
    for b in 0..(size / BS as u64) as usize {
        let got = &all[b * BS..(b + 1) * BS];
        let g_gen = u64::from_le_bytes(got[8..16].try_into().unwrap());
        assert!(
            g_gen >= h.flushed[b] && h.written[b].contains(&g_gen),
            "block {b}: generation {g_gen}, flushed {}, written {:?}",
            h.flushed[b],
            h.written[b]
        );
        check_block(got, b as u64 * BS as u64, g_gen);
    }
    // Stable: reading again (after every group was taken over) agrees.
    assert!(io.read(0, size)? == all, "blocks changed without a write");
    Ok(all)
}

/// A power loss under a running node, not a simulation of one: the node's
/// whole folder (its RocksDB metadata and its extent files) on
/// `cairn-lazyfs`, which loses every write no fsync covered. Twice: once
/// losing all of it, once only some, at random (torn tails, and overwrites
/// such as a sync mark undone or not). Oracle as above, and the node comes
/// back with its metadata (the vdisk and its groups) intact.
#[test]
fn power_loss_under_a_running_rf1_node_keeps_flushed_writes() -> Result<()> {
    use rand::SeedableRng;
    let _g = serial();
    let mut c = Cluster::start(1)?;
    let mut fs = c.put_on_lazyfs(0)?;
    c.wait_leader(std::time::Duration::from_secs(30))?;
    let size = 8 * MIB;
    let vd = c.make_vdisk("one", 1, "p", size, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for torn in [None, Some(7)] {
        let h = write_history(&c.block(0, &vd)?, size, &mut rng)?;
        c.kill9(0);
        let lost;
        (fs, lost) = fs.power_cycle(torn)?;
        assert!(lost > 0, "{torn:?}: nothing was unsynced at the crash");
        c.spawn(0)?;
        c.wait_leader(std::time::Duration::from_secs(30))?;
        check_history(&c, &vd, size, &h)
            .map_err(|e| anyhow::anyhow!("after a power loss ({torn:?}): {e}"))?;
    }
    Ok(())
}

/// How a node of an RF2 power-loss test goes down: `None` kill -9 only
/// (its page cache survives), `Some(None)` a power loss of everything
/// unsynced, `Some(Some(seed))` a power loss of some of it, at random.
type Loss = Option<Option<u64>>;

/// Runs the RF2 power-loss scenario: three nodes, each folder on its own
/// `cairn-lazyfs`, the history of [`write_history`] through node 0, every
/// node killed with -9 and each then losing what `losses` says. Every block
/// must read back a written generation at least as new as the flushed one,
/// the same on every read. Returns how many groups the takeover reconciled.
fn rf2_power_loss(losses: [Loss; 3]) -> Result<usize> {
    use rand::SeedableRng;
    let mut c = Cluster::start(3)?;
    let mut mounts = Vec::new();
    for i in 0..3 {
        // Unflushed writes stay unsynced until the power goes (no syncer
        // pass in between), so each node loses its own part of them.
        c.set_config(i, "data", "deferred_sync_ms = 600000")?;
        mounts.push(c.put_on_lazyfs(i)?);
    }
    c.wait_leader(std::time::Duration::from_secs(30))?;
    let size = 8 * MIB;
    let vd = c.make_vdisk("two", 2, "p", size, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let h = write_history(&c.block(0, &vd)?, size, &mut rng)?;
    for i in 0..3 {
        c.kill9(i);
    }
    let mut lost = 0;
    let mut again = Vec::new();
    for (fs, loss) in mounts.into_iter().zip(losses) {
        match loss {
            Some(torn) => {
                let (fs, n) = fs.power_cycle(torn)?;
                lost += n;
                again.push(fs);
            }
            None => again.push(fs),
        }
    }
    assert!(lost > 0, "nothing was unsynced at the crash");
    for i in 0..3 {
        c.spawn(i)?;
    }
    c.wait_leader(std::time::Duration::from_secs(30))?;
    let seen = check_history(&c, &vd, size, &h)?;
    let logs: String = c.nodes.iter().map(|n| n.log()).collect();
    let reconciled = logs.matches("replicas reconciled after takeover").count();
    // The replicas agree: with the owner gone, the others serve what it
    // served (a replica it did not reconcile would show older blocks).
    c.kill9(0);
    let after = check_history_via(&c, 1, &vd, size, &h)?;
    assert!(
        after == seen,
        "the surviving replicas disagree with the owner's"
    );
    Ok(reconciled)
}

/// The whole cluster loses power at once, each node some of what it had
/// not synced, its own way. Replicas usually cut their tails at about the
/// same place (the first record a tear reached), so few disagree: how many
/// is reported; the oracle is what must hold.
#[test]
fn power_loss_of_a_whole_rf2_cluster_keeps_flushed_writes() -> Result<()> {
    let _g = serial();
    let n = rf2_power_loss([Some(Some(10)), Some(Some(11)), Some(Some(12))])?;
    eprintln!("{n} of 8 groups reconciled after the power loss");
    Ok(())
}

/// Two nodes lose power (one all it had not synced, one some of it) and the
/// third only crashes, keeping its page cache: the replicas on it are ahead
/// of their peers, and the takeover gives every replica the newest version
/// of every block.
#[test]
fn replicas_that_lost_power_are_reconciled_with_one_that_did_not() -> Result<()> {
    let _g = serial();
    let n = rf2_power_loss([Some(Some(20)), Some(None), None])?;
    eprintln!("{n} of 8 groups reconciled");
    assert!(n > 0, "no replicas disagreed after the power loss");
    Ok(())
}

/// The `records_read` a node's last "disk opened" line reports, from the
/// part of its log after `from` bytes.
fn records_read_at_open(c: &Cluster, i: usize, from: usize) -> Option<u64> {
    let log = c.nodes[i].log();
    let line = log
        .get(from..)?
        .lines()
        .rfind(|l| l.contains("disk opened"))?;
    let v = line.split("records_read=").nth(1)?;
    v.split(|ch: char| !ch.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A restart opens extent groups from their index checkpoints instead of
/// reading every record: none after a clean stop, only what followed the
/// last checkpoint after kill -9 (the syncer saves one once a group has 64
/// new records). Either way every acknowledged write reads back, and
/// `cairn extent verify` finds each checkpoint equal to a whole scan of its
/// file.
#[test]
fn a_restart_opens_groups_from_their_index_checkpoints() -> Result<()> {
    use rand::{Rng, SeedableRng};
    use std::time::Duration;
    let _g = serial();
    let mut c = Cluster::start(1)?;
    c.wait_leader(Duration::from_secs(30))?;
    let size = 8 * MIB;
    let vd = c.make_vdisk("one", 1, "p", size, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut scatter = |c: &Cluster, gen: u64, n: usize| -> Result<Vec<u8>> {
        let io = c.block(0, &vd)?;
        for _ in 0..n {
            let off = rng.gen_range(0..size / BS as u64) * BS as u64;
            io.write_cached(off, &block(off, gen))?;
        }
        io.read(0, size)
    };
    let restart = |c: &mut Cluster| -> Result<Option<u64>> {
        let from = c.nodes[0].log().len();
        c.spawn(0)?;
        c.wait_leader(Duration::from_secs(30))?;
        Ok(records_read_at_open(c, 0, from))
    };
    let disk = c.disk_dirs()[0].display().to_string();

    let want = scatter(&c, 1, 1200)?;
    c.stop(0)?;
    assert!(c.nodes[0]
        .log()
        .contains("saved extent group index checkpoints"));
    c.cli_ok(&["extent", "verify", &disk])?;
    let read = restart(&mut c)?;
    assert_eq!(
        read,
        Some(0),
        "a clean stop saved them all\n{}",
        c.logs_tail()
    );
    assert!(
        c.block(0, &vd)?.read(0, size)? == want,
        "a restart changed the data"
    );

    scatter(&c, 2, 1200)?;
    // Two passes of the 1 s syncer: every group synced and checkpointed;
    // then 40 more records that no checkpoint covers.
    std::thread::sleep(Duration::from_millis(2500));
    let want = scatter(&c, 3, 40)?;
    c.kill9(0);
    let read = restart(&mut c)?.expect("a disk opened line");
    eprintln!(
        "records read when opening after kill -9: {read} (1,240 written since the clean stop)"
    );
    assert!(
        (40..8 * 64).contains(&read),
        "{read} of 1,240 new records read after kill -9"
    );
    assert!(
        c.block(0, &vd)?.read(0, size)? == want,
        "kill -9 lost writes"
    );
    c.stop(0)?;
    c.cli_ok(&["extent", "verify", &disk])?;
    Ok(())
}
