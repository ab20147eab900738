//! iSCSI acceptance (issue 5) on real `cairn` processes with real
//! initiators: libiscsi's conformance suite and tools, and QEMU (qemu-img,
//! and a guest under TCG) through its built-in libiscsi driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cairn_tests::{serial, sh, Cluster};
use serde_json::json;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Creates target `iqn` with LUN 0 → `vdisk_id` (and optional CHAP body fields).
fn make_target(c: &Cluster, iqn: &str, vdisk_id: &str, extra: serde_json::Value) -> Result<()> {
    let mut body = json!({"iqn": iqn, "luns": [{"lun": 0, "vdisk": vdisk_id}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let r = c.post(0, "/v1/iscsi/targets", &body)?;
    ensure!(r.status == 201, "create target: {} {}", r.status, r.body);
    Ok(())
}

fn url(c: &Cluster, node: usize, iqn: &str) -> String {
    format!("iscsi://{}/{iqn}/0", c.nodes[node].iscsi_addr())
}

/// Counts of one `iscsi-test-cu` run, classified like
/// `shared/peers/iscsi-conformance.sh` (a test that printed [SKIPPED] is a
/// skip even though CUnit counts it as passed).
#[derive(Debug, Default)]
struct Conformance {
    pass: Vec<String>,
    fail: Vec<String>,
    skip: Vec<String>,
}

fn classify(log: &str, family: &str, into: &mut Conformance) {
    let mut suite = String::new();
    let mut test: Option<(String, bool, Option<bool>)> = None;
    let flush =
        |t: &mut Option<(String, bool, Option<bool>)>, suite: &str, into: &mut Conformance| {
            if let Some((name, skip, res)) = t.take() {
                let full = format!("{family}.{suite}.{name}");
                match res {
                    Some(false) => into.fail.push(full),
                    _ if skip => into.skip.push(full),
                    Some(true) => into.pass.push(full),
                    None => into.fail.push(format!("{full} (no result)")),
                }
            }
        };
    for line in log.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            flush(&mut test, &suite, into);
            suite = s.trim().to_string();
        } else if let Some(t) = line.strip_prefix("  Test: ") {
            flush(&mut test, &suite, into);
            let name = t.split_whitespace().next().unwrap_or("").to_string();
            test = Some((name, false, None));
            // The result may be on the same line.
            if let Some(cur) = test.as_mut() {
                if line.contains("...passed") {
                    cur.2 = Some(true);
                } else if line.contains("...FAILED") {
                    cur.2 = Some(false);
                }
            }
        } else if line.starts_with("Run Summary") {
            flush(&mut test, &suite, into);
        } else if let Some(cur) = test.as_mut() {
            if line.contains("[SKIPPED]") {
                cur.1 = true;
            }
            let l = line.trim_end();
            if l.ends_with("passed") && (l == "passed" || l.ends_with("...passed")) {
                cur.2 = Some(true);
            }
            if l == "FAILED" || l.ends_with("...FAILED") {
                cur.2 = Some(false);
            }
        }
    }
    flush(&mut test, &suite, into);
}

fn run_conformance(tests: &[&str], urls: &[String], log: &std::path::Path) -> Result<Conformance> {
    let mut all = Conformance::default();
    for family in tests {
        let mut args = vec!["-d", "-v", "-t", family];
        args.extend(urls.iter().map(String::as_str));
        let (_, text) = tool("iscsi-test-cu", &args)
            .context("iscsi-test-cu (Debian libiscsi-bin) is not installed")?;
        std::fs::write(log.join(format!("conformance-{family}.log")), &text)?;
        let fam = family.split('.').next().unwrap_or(family);
        classify(&text, fam, &mut all);
    }
    Ok(all)
}

#[test]
fn conformance_suite_passes_on_a_three_node_cluster() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(3)?;
    let vd = c.make_vdisk("rf2", 2, "conf", GIB, 0)?;
    let iqn = "iqn.2026-11.io.cairn.test:conformance";
    make_target(&c, iqn, &vd, json!({}))?;
    let out = std::env::var_os("CAIRN_TEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| c.root.path().to_path_buf());
    // Through a node that does not own the vdisk: every command is
    // forwarded to the owner, the longer path.
    let t0 = Instant::now();
    let r = run_conformance(&["SCSI", "iSCSI"], &[url(&c, 1, iqn)], &out)?;
    eprintln!(
        "iscsi-test-cu: pass={} fail={} skip={} in {:.0?} (logs in {})",
        r.pass.len(),
        r.fail.len(),
        r.skip.len(),
        t0.elapsed(),
        out.display()
    );
    for f in &r.fail {
        eprintln!("FAIL {f}");
    }
    ensure!(
        r.fail.is_empty(),
        "{} conformance failures: {:?}\n{}",
        r.fail.len(),
        r.fail,
        c.logs_tail()
    );
    // tgt, measured on this machine: 160 passes (shared/peers/results).
    ensure!(r.pass.len() >= 160, "only {} passes", r.pass.len());

    // Multipath: the same LUN through two nodes' portals, a non-owner's
    // first. libiscsi opens its second path (and, in the reservation tests,
    // its second initiator) on the second URL: data written through one
    // path is read through the other, COMPARE AND WRITE is atomic across
    // paths, a reset through one path raises a unit attention on the other,
    // and a reservation taken through one node binds initiators on another.
    let urls = [url(&c, 1, iqn), url(&c, 0, iqn)];
    let families = [
        "SCSI.MultipathIO",
        "SCSI.PrinReadKeys",
        "SCSI.PrinReportCapabilities",
        "SCSI.ProutRegister",
        "SCSI.ProutReserve",
        "SCSI.ProutClear",
        "SCSI.ProutPreempt",
    ];
    let r = run_conformance(&families, &urls, &out)?;
    eprintln!(
        "two portals: pass={} fail={:?} skip={:?}",
        r.pass.len(),
        r.fail,
        r.skip
    );
    ensure!(
        r.fail.is_empty(),
        "two-portal failures: {:?}\n{}",
        r.fail,
        c.logs_tail()
    );
    for t in [
        "MultipathIO.Reset",
        "MultipathIO.Simple",
        "ProutReserve.AccessWE",
    ] {
        ensure!(
            r.pass.iter().any(|p| p.ends_with(t)),
            "{t} did not pass: {r:?}"
        );
    }
    Ok(())
}

/// (success, stdout + stderr) of a command.
fn tool(cmd: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = sh(cmd, args)?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn discovery_inquiry_and_chap() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(3)?;
    let vd = c.make_vdisk("rf2", 2, "inq", 256 * MIB, 0)?;
    let open_iqn = "iqn.2026-11.io.cairn.test:open";
    let chap_iqn = "iqn.2026-11.io.cairn.test:chap";
    let mutual_iqn = "iqn.2026-11.io.cairn.test:mutual";
    let secret = "Chap-Secret-4Kq9";
    let tsecret = "Target-Sec-7Zp2";
    make_target(&c, open_iqn, &vd, json!({}))?;
    make_target(
        &c,
        chap_iqn,
        &vd,
        json!({"chap_user": "host1", "chap_secret": secret}),
    )?;
    make_target(
        &c,
        mutual_iqn,
        &vd,
        json!({"chap_user": "host1", "chap_secret": secret,
               "mutual_user": "cairn", "mutual_secret": tsecret}),
    )?;
    // Discovery through a node that owns nothing lists every target.
    let portal = c.nodes[2].iscsi_addr();
    let (ok, ls) = tool("iscsi-ls", &[&format!("iscsi://{portal}")])?;
    ensure!(ok, "iscsi-ls failed: {ls}");
    for iqn in [open_iqn, chap_iqn, mutual_iqn] {
        ensure!(ls.contains(iqn), "iscsi-ls does not list {iqn}: {ls}");
    }
    ensure!(
        ls.contains(&portal),
        "iscsi-ls shows no portal {portal}: {ls}"
    );
    // iscsi-ls -s logs in to each target to show its LUNs; without CHAP
    // secrets only the open one lets it in.
    let (_, ls) = tool("iscsi-ls", &["-s", &format!("iscsi://{portal}")])?;
    ensure!(
        ls.contains("Lun:0"),
        "iscsi-ls shows no LUN of the open target: {ls}"
    );

    let (ok, inq) = tool("iscsi-inq", &[&url(&c, 2, open_iqn)])?;
    ensure!(ok, "iscsi-inq failed: {inq}");
    ensure!(inq.contains("CAIRN"), "INQUIRY without our vendor: {inq}");
    let (ok, vpd) = tool(
        "iscsi-inq",
        &["-e", "1", "-c", "131", &url(&c, 0, open_iqn)],
    )?;
    ensure!(ok, "iscsi-inq VPD 0x83 failed: {vpd}");
    // The same LUN through two nodes has one identity (multipath).
    let (_, vpd2) = tool(
        "iscsi-inq",
        &["-e", "1", "-c", "131", &url(&c, 1, open_iqn)],
    )?;
    // The logical unit's NAA designator: the line after its type.
    let naa = |s: &str| {
        s.lines()
            .skip_while(|l| !l.contains("Designator Type:(3) NAA"))
            .find(|l| l.contains("Designator:"))
            .map(str::to_string)
    };
    ensure!(
        naa(&vpd).is_some() && naa(&vpd) == naa(&vpd2),
        "VPD 0x83 differs between portals:\n{vpd}\n---\n{vpd2}"
    );

    // CHAP: the right secret logs in, a wrong one and none are refused.
    let addr = c.nodes[1].iscsi_addr();
    let good = format!("iscsi://host1%{secret}@{addr}/{chap_iqn}/0");
    let (ok, out) = tool("iscsi-inq", &[&good])?;
    ensure!(ok, "CHAP login with the right secret failed: {out}");
    let bad = format!("iscsi://host1%Wrong-Secret-000@{addr}/{chap_iqn}/0");
    let (ok, out) = tool("iscsi-inq", &[&bad])?;
    ensure!(!ok, "CHAP login with a wrong secret succeeded: {out}");
    let (ok, out) = tool("iscsi-inq", &[&format!("iscsi://{addr}/{chap_iqn}/0")])?;
    ensure!(!ok, "login without CHAP to a CHAP target succeeded: {out}");
    // Mutual CHAP: the target must prove it knows its own secret.
    let mutual = format!(
        "iscsi://host1%{secret}@{addr}/{mutual_iqn}/0?target_user=cairn&target_password={tsecret}"
    );
    let (ok, out) = tool("iscsi-inq", &[&mutual])?;
    ensure!(ok, "mutual CHAP login failed: {out}");
    let wrong_target = format!(
        "iscsi://host1%{secret}@{addr}/{mutual_iqn}/0?target_user=cairn&target_password=Not-The-Secret1"
    );
    let (ok, out) = tool("iscsi-inq", &[&wrong_target])?;
    ensure!(
        !ok,
        "initiator accepted a target that does not know the mutual secret: {out}"
    );
    // No secret in any node's log.
    let logs = c.logs_tail();
    for i in 0..c.nodes.len() {
        let log = c.nodes[i].log();
        ensure!(
            !log.contains(secret) && !log.contains(tsecret),
            "node {i} logged a CHAP secret"
        );
    }
    ensure!(
        logs.contains("CHAP authentication failed"),
        "the refused login left no log line"
    );
    Ok(())
}

fn write_pattern_file(path: &std::path::Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; MIB as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for mb in 0..size / MIB {
        // Every eighth MiB stays zero (thin provisioning must read it back).
        if mb % 8 == 5 {
            block.fill(0);
        } else {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

fn guest_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("guest")
        .join(name)
}

#[test]
fn qemu_img_round_trip_and_a_guest_survives_a_replica_kill() -> Result<()> {
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let vd = c.make_vdisk("rf2", 2, "vm", GIB, 0)?;
    let iqn = "iqn.2026-11.io.cairn.test:vm";
    make_target(&c, iqn, &vd, json!({}))?;
    let lun = url(&c, 0, iqn);

    // qemu-img convert: 1 GiB in, and back out byte-identical.
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    write_pattern_file(&src, GIB)?;
    let t0 = Instant::now();
    let (ok, out) = tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &lun,
        ],
    )?;
    ensure!(ok, "qemu-img convert into the LUN failed: {out}");
    let t_in = t0.elapsed();
    let t0 = Instant::now();
    let (ok, out) = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &lun,
            back.to_str().unwrap(),
        ],
    )?;
    ensure!(ok, "qemu-img convert out of the LUN failed: {out}");
    let t_out = t0.elapsed();
    let (same, out) = tool("cmp", &[src.to_str().unwrap(), back.to_str().unwrap()])?;
    ensure!(same, "the LUN's copy differs from the image: {out}");
    eprintln!("qemu-img convert 1 GiB: in {t_in:.1?}, out {t_out:.1?}");
    drop((src, back));

    // A guest writes a token and a pattern through the LUN.
    let (ok, out) = tool("bash", &[guest_script("build.sh").to_str().unwrap()])?;
    ensure!(ok, "guest build failed: {out}");
    let token = format!("cairn-{}", std::process::id());
    let (ok, out) = tool(
        "bash",
        &[
            guest_script("run.sh").to_str().unwrap(),
            &lun,
            "write",
            &token,
            "16",
        ],
    )?;
    ensure!(ok, "guest write failed: {out}");

    // The guest rewrites and verifies while the non-owner replica is killed.
    let stress = std::thread::spawn({
        let lun = lun.clone();
        let token = token.clone();
        move || {
            tool(
                "bash",
                &[
                    guest_script("run.sh").to_str().unwrap(),
                    &lun,
                    "stress",
                    &token,
                    "40",
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_secs(25));
    let victim = (1..3)
        .find(|i| {
            c.disk_dirs()[*i]
                .read_dir()
                .map(|d| d.count() > 0)
                .unwrap_or(false)
        })
        .unwrap_or(1);
    eprintln!("killing node index {victim} (a non-owner replica) while the guest writes");
    c.kill9(victim);
    let (ok, out) = stress
        .join()
        .map_err(|_| anyhow::anyhow!("stress thread panicked"))??;
    ensure!(ok, "guest saw an error while a replica was killed: {out}");
    if !out.contains("CAIRN-GUEST: OK") {
        bail!("guest stress gave no OK line: {out}");
    }

    // After the guest exited, a new guest reads the token back.
    let (ok, out) = tool(
        "bash",
        &[
            guest_script("run.sh").to_str().unwrap(),
            &lun,
            "read",
            &token,
        ],
    )?;
    ensure!(ok && out.contains(&token), "token not read back: {out}");
    Ok(())
}

/// A host logged in to a node that does not own the vdisk keeps its session
/// when the owner dies: the portal's device follows the owner to its
/// successor (the metadata leader moves ownership after `DEAD_AFTER`), and
/// the host sees BUSY, which it retries, never an error; what it wrote
/// before the failure reads back after it.
#[test]
fn a_session_on_another_node_survives_an_owner_failover() -> Result<()> {
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let vd = c.make_vdisk("rf2", 2, "fo", GIB, 0)?;
    let iqn = "iqn.2026-11.io.cairn.test:failover";
    make_target(&c, iqn, &vd, json!({}))?;
    let lun = url(&c, 1, iqn);
    // One qemu-io process, one iSCSI session through node 1, idle while the
    // owner (node 0) is killed, then reading and writing again.
    let io = std::thread::spawn(move || {
        // Bounded: a session that lost its vdisk retries BUSY for minutes.
        tool(
            "timeout",
            &[
                "120",
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0xa1 0 4M",
                "-c",
                "sleep 15000",
                "-c",
                "read -P 0xa1 0 4M",
                "-c",
                "write -P 0xb2 4M 4M",
                "-c",
                "read -P 0xb2 4M 4M",
                "-c",
                "flush",
                &lun,
            ],
        )
    });
    std::thread::sleep(Duration::from_secs(5));
    eprintln!("killing the owner (node index 0)");
    c.kill9(0);
    let t0 = Instant::now();
    let (ok, out) = io
        .join()
        .map_err(|_| anyhow::anyhow!("qemu-io thread panicked"))??;
    eprintln!(
        "qemu-io finished {:.1?} after the kill:\n{out}",
        t0.elapsed()
    );
    ensure!(
        ok && !out.contains("failed") && !out.contains("error"),
        "the session saw an error across the owner failover: {out}\n{}",
        c.logs_tail()
    );
    let done = |what: &str| out.matches(what).count();
    ensure!(
        done("wrote 4194304/4194304") == 2 && done("read 4194304/4194304") == 2,
        "not every command completed: {out}"
    );
    Ok(())
}

/// Persistent reservations are kept with the vdisk: after the owner dies,
/// its successor enforces the reservation a host took before (SCSI-3 PR
/// fencing, as Windows failover clusters and Pacemaker's fence_scsi use it,
/// must survive a storage node's failure).
#[test]
fn reservations_survive_an_owner_failover() -> Result<()> {
    use cairn_tests::iscsi_client::Client;
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let vd = c.make_vdisk("rf2", 2, "pr", GIB, 0)?;
    let iqn = "iqn.2026-11.io.cairn.test:pr";
    make_target(&c, iqn, &vd, json!({}))?;
    let (p1, p2) = (c.nodes[1].iscsi_addr(), c.nodes[2].iscsi_addr());
    let mut a = Client::login(&p1, "iqn.2026-11.io.cairn.test:host-a", 1, iqn)?;
    let mut b = Client::login(&p2, "iqn.2026-11.io.cairn.test:host-b", 2, iqn)?;
    // Both hosts may write; then A registers and takes WRITE EXCLUSIVE.
    ensure!(b.write_block(0, 0xB0)? == 0, "B's first write failed");
    ensure!(a.pr_out(0, 0, 0, 0xA11CE)? == 0, "REGISTER failed");
    ensure!(a.pr_out(1, 1, 0xA11CE, 0)? == 0, "RESERVE failed");
    ensure!(
        b.write_block(0, 0xB1)? == 0x18,
        "B's write was not refused under A's reservation"
    );
    eprintln!("killing the owner (node index 0)");
    c.kill9(0);
    // Until the new owner serves, commands answer BUSY (or a unit
    // attention once); then the reservation must still be there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        match a.reservation() {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the new owner: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => bail!("no answer from a new owner in 60 s: {e}\n{}", c.logs_tail()),
        }
    };
    ensure!(
        seen == Some((0xA11CE, 1)),
        "the reservation did not survive the failover: {seen:?}"
    );
    let mut refused = b.write_block(0, 0xB2)?;
    while refused == 0x08 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        refused = b.write_block(0, 0xB2)?;
    }
    ensure!(
        refused == 0x18,
        "B's write after the failover: status {refused:#04x}, not RESERVATION CONFLICT"
    );
    ensure!(a.write_block(0, 0xA1)? == 0, "the holder cannot write");
    // Released and unregistered: B writes again.
    ensure!(a.pr_out(2, 1, 0xA11CE, 0)? == 0, "RELEASE failed");
    ensure!(a.pr_out(0, 0, 0xA11CE, 0)? == 0, "unregister failed");
    ensure!(
        b.write_block(0, 0xB3)? == 0,
        "B cannot write after the release"
    );
    Ok(())
}

/// A session's write right after a snapshot is not in the snapshot: the
/// owner sees the new generation at its next I/O (it used to see it at its
/// next route check, up to 2 s later, and wrote the snapshot's blocks).
#[test]
fn a_write_right_after_a_snapshot_stays_out_of_it() -> Result<()> {
    use cairn_tests::iscsi_client::Client;
    let _g = serial();
    let c = Cluster::start(3)?;
    let vd = c.make_vdisk("snap", 2, "s", 64 << 20, 0)?;
    let iqn = "iqn.2026-11.io.cairn.test:snap";
    make_target(&c, iqn, &vd, json!({}))?;
    // On the owner's portal: the session writes to the volume itself.
    let mut a = Client::login(
        &c.nodes[0].iscsi_addr(),
        "iqn.2026-11.io.cairn.test:h",
        1,
        iqn,
    )?;
    for round in 0..3u8 {
        let before = 0xA0 + round;
        ensure!(
            a.write_block(8, before)? == 0,
            "write before snapshot {round}"
        );
        let name = format!("s{round}");
        let r = c.post(
            1,
            "/v1/datastores/snap/vdisks/s/snapshots",
            &json!({ "name": name }),
        )?;
        ensure!(r.status == 201, "snapshot: {} {}", r.status, r.body);
        ensure!(
            a.write_block(8, 0xB0 + round)? == 0,
            "write after snapshot {round}"
        );
        let r = c.post(
            1,
            &format!("/v1/datastores/snap/vdisks/s/snapshots/{name}/clone"),
            &json!({ "name": format!("c{round}") }),
        )?;
        ensure!(r.status == 201, "clone: {} {}", r.status, r.body);
        let clone = r.body["id"].as_str().unwrap_or_default().to_string();
        let got = c.block(2, &clone)?.read(8 * 512, 512)?;
        ensure!(
            got == vec![before; 512],
            "round {round}: the snapshot holds {:#04x}, not {before:#04x}",
            got[0]
        );
        let live = c.block(2, &vd)?.read(8 * 512, 512)?;
        ensure!(
            live == vec![0xB0 + round; 512],
            "round {round}: the vdisk lost its write"
        );
    }
    Ok(())
}

/// The `[iscsi]` ping settings in `cairn.toml` reach the running target:
/// with a 1 s interval and a 2 s timeout, a logged-in initiator that stays
/// silent is pinged well before the default interval (15 s) and dropped
/// well before the default timeout (30 s) would allow; one that answers its
/// pings keeps its session and runs commands.
#[test]
fn ping_settings_in_cairn_toml_reach_the_target() -> Result<()> {
    use cairn_iscsi::pdu::{op, RESERVED_TAG};
    use cairn_tests::iscsi_client::Client;
    let _g = serial();
    let mut c = Cluster::start(1)?;
    let vd = c.make_vdisk("rf1", 1, "ping", 64 * MIB, 0)?;
    let iqn = "iqn.2026-11.io.cairn.test:ping";
    make_target(&c, iqn, &vd, json!({}))?;
    c.stop(0)?;
    let cfg = c.nodes[0].dir.join("cairn.toml");
    let text = std::fs::read_to_string(&cfg)?;
    ensure!(
        !text.contains("[iscsi]"),
        "the default config has [iscsi]: {text}"
    );
    std::fs::write(
        &cfg,
        format!("{text}\n[iscsi]\nnop_interval_secs = 1\nnop_timeout_secs = 2\n"),
    )?;
    c.spawn(0)?;
    let portal = c.nodes[0].iscsi_addr();
    let login = |name: &str, isid: u8| -> Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Client::login(&portal, name, isid, iqn) {
                Ok(cl) => return Ok(cl),
                Err(e) if Instant::now() > deadline => {
                    bail!("no login after the restart: {e:#}\n{}", c.logs_tail())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    };
    let mut silent = login("iqn.2026-11.io.cairn.test:silent", 1)?;

    // The silent initiator: pinged, never answers, dropped.
    let t0 = Instant::now();
    let ping = silent
        .next_pdu(Duration::from_secs(10))?
        .context("closed before any ping")?;
    ensure!(
        ping.opcode() == op::NOP_IN && ping.itt() == RESERVED_TAG,
        "expected a NOP-In ping, got opcode {:#04x}",
        ping.opcode()
    );
    let pinged = t0.elapsed();
    let closed = loop {
        match silent.next_pdu(Duration::from_secs(20))? {
            None => break t0.elapsed(),
            Some(p) => ensure!(p.opcode() == op::NOP_IN, "opcode {:#04x}", p.opcode()),
        }
    };
    eprintln!("silent initiator: pinged after {pinged:.1?}, dropped after {closed:.1?}");
    ensure!(
        closed < Duration::from_secs(14),
        "dropped after {closed:?}: the configured timeout was not used"
    );

    // An initiator that answers (`command` answers pings) keeps its session.
    let mut awake = login("iqn.2026-11.io.cairn.test:awake", 2)?;
    let tur = [0u8; 6];
    // Idle for longer than the interval between commands: each command
    // first meets a ping, answers it, then gets its status.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let a = awake.command(&tur, &[], 0)?;
        ensure!(a.status == 0, "TEST UNIT READY: status {}", a.status);
    }
    Ok(())
}
