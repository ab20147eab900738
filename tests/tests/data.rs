//! Data service acceptance: real `cairn` processes, real extent files, I/O
//! through the front-end trait (forwarded over each node's RPC port).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::Result;
use cairn_tests::{serial, Cluster};

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

fn extent_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ceg") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
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
    let dirs: Vec<String> = c
        .disk_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let mut args = vec!["extent", "verify"];
    args.extend(dirs.iter().map(String::as_str));
    c.cli_ok(&args)?;
    let img = c.root.path().join("export.img");
    let img_s = img.display().to_string();
    let mut args = vec![
        "extent",
        "export",
        "--vdisk",
        vd.as_str(),
        "-o",
        img_s.as_str(),
    ];
    args.extend(dirs.iter().map(String::as_str));
    c.cli_ok(&args)?;
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
    // The owner's copies were rewritten: its files verify clean again.
    let d0 = c.nodes[0].dir.join("disks").display().to_string();
    c.cli_ok(&["extent", "verify", d0.as_str()])?;
    Ok(())
}
