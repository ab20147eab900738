//! Acceptance tests of the metadata service (issue 3), on real `cairn`
//! processes. Each test records what was acknowledged and checks it after
//! the fault (the oracle), never just "no error".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cairn_tests::{parallel, serial, Cluster, NodeClient};
use serde_json::{json, Value};

const VDISKS: &str = "/v1/datastores/ds/vdisks";

fn create_ds(c: &Cluster, rf: u32) -> Result<()> {
    let r = c.post(
        0,
        "/v1/datastores",
        &json!({ "name": "ds", "replication_factor": rf }),
    )?;
    if r.status != 201 {
        bail!("datastore create: {} {}", r.status, r.body);
    }
    Ok(())
}

/// Creates vdisks `<prefix><k>` for k in 0..n through every given client;
/// returns the names whose creation was acknowledged (201).
fn write_vdisks(
    clients: Vec<NodeClient>,
    prefix: &str,
    n: usize,
    threads: usize,
) -> BTreeSet<String> {
    let prefix = prefix.to_string();
    let results = parallel(n, threads, move |k| {
        let name = format!("{prefix}{k}");
        let body = json!({ "name": name, "size_bytes": 1u64 << 30 });
        match clients[k % clients.len()].post(VDISKS, &body) {
            Ok(r) if r.status == 201 => Some(name),
            _ => None,
        }
    });
    results.into_iter().flatten().collect()
}

/// The vdisk names node `i` holds, through a linearizable read.
/// Waits until node index `i` has applied up to `target`; `what` says what
/// went wrong if it has not by `deadline`.
fn wait_applied(c: &Cluster, i: usize, target: u64, deadline: Instant, what: &str) -> Result<()> {
    loop {
        if let Ok(s) = c.status(i) {
            if s["applied_index"].as_u64().unwrap_or(0) >= target {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{what}: not applied up to {target}\n{}", c.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names_on(c: &Cluster, i: usize) -> Result<BTreeSet<String>> {
    let r = c.get(i, VDISKS)?;
    if r.status != 200 {
        bail!("list on node index {i}: {} {}", r.status, r.body);
    }
    Ok(r.body
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn running_clients(c: &Cluster) -> Vec<NodeClient> {
    (0..c.nodes.len())
        .filter(|i| c.nodes[*i].child.is_some())
        .map(|i| c.client(i))
        .collect()
}

fn first_running_except(c: &Cluster, skip: usize) -> usize {
    (0..c.nodes.len())
        .find(|i| *i != skip && c.nodes[*i].child.is_some())
        .expect("a running node")
}

#[test]
fn three_nodes_form_survive_leader_kill_and_catch_up() -> Result<()> {
    let _g = serial();
    let mut c = Cluster::start(3)?;
    create_ds(&c, 3)?;

    let acked = write_vdisks(running_clients(&c), "a", 1000, 8);
    assert_eq!(
        acked.len(),
        1000,
        "all 1,000 writes must be acknowledged on a healthy cluster"
    );

    // Concurrent linearizable reads on every node, followers included: each
    // must answer (ReadIndex contexts must not collide across nodes).
    let readers = running_clients(&c);
    let reads = parallel(300, 12, move |k| {
        readers[k % readers.len()]
            .get("/v1/datastores/ds")
            .map(|r| r.status)
            .unwrap_or(0)
    });
    let failed = reads.iter().filter(|s| **s != 200).count();
    assert_eq!(
        failed, 0,
        "{failed} of 300 concurrent linearizable reads failed"
    );

    let old = c.wait_leader(Duration::from_secs(10))?;
    let li = c.index_of(old);
    let killed_at = Instant::now();
    c.kill9(li);
    let survivor = first_running_except(&c, li);
    let new_leader = loop {
        if let Ok(s) = c.status(survivor) {
            let l = s["leader_id"].as_u64().unwrap_or(0);
            if l != 0 && l != old {
                break l;
            }
        }
        if killed_at.elapsed() > Duration::from_secs(5) {
            bail!(
                "no new leader within 5 s of killing leader {old}\n{}",
                c.logs_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let failover = killed_at.elapsed();
    eprintln!("leader {old} killed; node {new_leader} leads after {failover:?}");
    assert!(failover < Duration::from_secs(5));

    let after_kill = names_on(&c, survivor)?;
    let lost: Vec<_> = acked.difference(&after_kill).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost after leader kill: {lost:?}"
    );

    // The cluster keeps committing with one node down.
    let acked2 = write_vdisks(running_clients(&c), "b", 200, 4);
    assert_eq!(
        acked2.len(),
        200,
        "writes with 2 of 3 nodes up must succeed"
    );

    // The killed node restarts and catches up.
    c.spawn(li)?;
    let target = c.status(survivor)?["commit_index"].as_u64().unwrap_or(0);
    wait_applied(
        &c,
        li,
        target,
        Instant::now() + Duration::from_secs(60),
        "restarted node did not catch up",
    )?;
    let on_restarted = names_on(&c, li)?;
    for name in acked.iter().chain(&acked2) {
        assert!(
            on_restarted.contains(name),
            "restarted node misses acknowledged {name}"
        );
    }

    // The whole cluster dies at once (power loss). Applied state is written
    // without the WAL, so every node lost what its memtables held and must
    // apply it again from its raft log: nothing acknowledged may be missing
    // on any node.
    let commit = c.status(survivor)?["commit_index"].as_u64().unwrap_or(0);
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        c.spawn(i)?;
    }
    c.wait_leader(Duration::from_secs(20))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..3 {
        wait_applied(
            &c,
            i,
            commit,
            deadline,
            &format!("node index {i} did not apply everything after a whole-cluster kill"),
        )?;
        let names = names_on(&c, i)?;
        let lost: Vec<_> = acked
            .iter()
            .chain(&acked2)
            .filter(|n| !names.contains(*n))
            .collect();
        assert!(
            lost.is_empty(),
            "node index {i} lost acknowledged writes after a whole-cluster kill: {lost:?}"
        );
    }
    Ok(())
}

#[test]
fn late_node_receives_snapshot_then_add_and_remove_members() -> Result<()> {
    let _g = serial();
    let mut c = Cluster::start(3)?;
    create_ds(&c, 2)?;
    let acked = write_vdisks(running_clients(&c), "v", 10_000, 16);
    assert_eq!(
        acked.len(),
        10_000,
        "all 10,000 writes must be acknowledged"
    );

    let i4 = c.add_node()?;
    let voters = c.wait_voters(4, Duration::from_secs(120))?;
    assert!(voters.contains(&4), "node 4 must be a voter: {voters:?}");
    let s4 = c.status(i4)?;
    let first = s4["first_index"].as_u64().unwrap_or(0);
    assert!(
        first > 10_000,
        "node 4 must start from a snapshot past the 10,000 entries, first_index={first}"
    );
    let log4 = c.nodes[i4].log();
    assert!(
        log4.contains("installed metadata snapshot"),
        "node 4 log must show the snapshot install"
    );
    assert!(
        log4.contains("metadata snapshot file received"),
        "the state must come as a file beside the raft message, not inside it"
    );
    let on4 = names_on(&c, i4)?;
    assert!(
        acked.is_subset(&on4),
        "node 4 misses {} acknowledged vdisks",
        acked.difference(&on4).count()
    );

    // Remove a follower that is not node 4.
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let victim = [2u64, 3]
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let vi = c.index_of(victim);
    let mut args: Vec<String> = c.conn_args(0);
    args.extend(["cluster".into(), "remove-node".into(), victim.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.cli_ok(&args)?;
    let voters = c.wait_voters(3, Duration::from_secs(30))?;
    assert!(
        !voters.contains(&victim),
        "node {victim} must be gone: {voters:?}"
    );
    c.stop(vi)?;

    let acked2 = write_vdisks(running_clients(&c), "after-remove-", 50, 4);
    assert_eq!(acked2.len(), 50, "the 3 remaining voters commit");
    let nodes = c.get(0, "/v1/nodes")?.body;
    let role = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"].as_u64() == Some(victim)))
        .map(|n| n["role"].clone());
    assert_eq!(role, Some(Value::from("removed")));
    Ok(())
}

/// A follower down while the log moved past compaction comes back by a
/// snapshot file: it must end with exactly the leader's vdisks, including
/// the absence of those deleted while it was down (the install replaces
/// its whole state, it does not only add to it).
#[test]
fn a_follower_behind_log_compaction_catches_up_by_snapshot_and_drops_what_was_deleted() -> Result<()>
{
    let _g = serial();
    let mut c = Cluster::start(3)?;
    create_ds(&c, 3)?;
    let doomed = write_vdisks(running_clients(&c), "doomed-", 100, 8);
    assert_eq!(doomed.len(), 100);
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let fi = (0..3)
        .find(|i| c.nodes[*i].id != leader)
        .expect("a follower");
    let target = c.status(c.index_of(leader))?["commit_index"]
        .as_u64()
        .unwrap_or(0);
    wait_applied(
        &c,
        fi,
        target,
        Instant::now() + Duration::from_secs(30),
        "follower behind",
    )?;
    assert!(doomed.is_subset(&names_on(&c, fi)?));
    c.kill9(fi);

    let li = c.index_of(leader);
    for name in &doomed {
        let r = c.request(li, "DELETE", &format!("{VDISKS}/{name}"), None)?;
        assert!(
            r.status == 200 || r.status == 204,
            "delete {name}: {} {}",
            r.status,
            r.body
        );
    }
    let kept = write_vdisks(running_clients(&c), "kept-", 10_000, 16);
    assert_eq!(kept.len(), 10_000);
    let first = c.status(li)?["first_index"].as_u64().unwrap_or(0);
    assert!(
        first > target + 1,
        "the log must have been compacted past the follower ({first})"
    );

    c.spawn(fi)?;
    let target = c.status(li)?["commit_index"].as_u64().unwrap_or(0);
    wait_applied(
        &c,
        fi,
        target,
        Instant::now() + Duration::from_secs(120),
        "no catch-up",
    )?;
    let log = c.nodes[fi].log();
    assert!(
        log.contains("metadata snapshot file received")
            && log.contains("installed metadata snapshot"),
        "the follower must catch up by a snapshot file"
    );
    let on_follower = names_on(&c, fi)?;
    let on_leader = names_on(&c, li)?;
    let extra: Vec<_> = on_follower.difference(&on_leader).take(5).collect();
    let missing: Vec<_> = on_leader.difference(&on_follower).take(5).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the follower's vdisks must be the leader's: extra {extra:?}..., missing {missing:?}..."
    );
    assert!(kept.is_subset(&on_follower));
    assert!(
        on_follower.is_disjoint(&doomed),
        "vdisks deleted while the follower was down must be gone from it"
    );

    // A received snapshot raft can no longer install (below the applied
    // index, as one turned down on arrival is) goes while the node runs;
    // one above it (it may be about to be installed) stays.
    let snaps = c.nodes[fi].dir.join("metadata-snapshots");
    let (stale, ahead) = (
        snaps.join("received-1-1.snap"),
        snaps.join(format!("received-{}-1.snap", u64::MAX / 2)),
    );
    std::fs::write(&stale, vec![0u8; 1 << 20])?;
    std::fs::write(&ahead, b"not yet")?;
    let t0 = Instant::now();
    while stale.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "a stale received snapshot file stayed"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        ahead.exists(),
        "a snapshot that may still be installed was removed"
    );
    std::fs::remove_file(&ahead)?;
    Ok(())
}

#[test]
fn minority_partition_cannot_commit_majority_can_then_all_agree() -> Result<()> {
    let _g = serial();
    let c = Cluster::start_netns(3)?;
    create_ds(&c, 3)?;
    let mut acked = write_vdisks(running_clients(&c), "pre", 50, 4);
    assert_eq!(acked.len(), 50);

    // Cut off the leader: the hardest minority (it must stop committing).
    let old = c.wait_leader(Duration::from_secs(10))?;
    let m = c.index_of(old);
    c.partition(m)?;

    let r = c.post(
        m,
        VDISKS,
        &json!({ "name": "minority-write", "size_bytes": 4096 }),
    )?;
    assert_ne!(
        r.status, 201,
        "a partitioned minority must not acknowledge a write: {}",
        r.body
    );
    assert_eq!(
        r.status, 503,
        "expected a clear 503 from the minority: {}",
        r.body
    );
    let r = c.get(m, VDISKS)?;
    assert_eq!(
        r.status, 503,
        "a partitioned minority must not serve linearizable reads"
    );

    let majority: Vec<usize> = (0..3).filter(|i| *i != m).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = c.status(majority[0]);
        if let Ok(s) = s {
            let l = s["leader_id"].as_u64().unwrap_or(0);
            if l != 0 && l != old {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("majority elected no leader\n{}", c.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let maj_clients: Vec<NodeClient> = majority.iter().map(|i| c.client(*i)).collect();
    let during = write_vdisks(maj_clients, "maj", 50, 4);
    assert_eq!(
        during.len(),
        50,
        "the majority must commit while the minority is cut off"
    );
    acked.extend(during);

    c.heal(m)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<_> = (0..3).map(|i| names_on(&c, i)).collect();
        if let [Ok(a), Ok(b), Ok(cc)] = &views[..] {
            if a == b && b == cc && acked.is_subset(a) {
                eprintln!(
                    "all 3 nodes agree on {} vdisks; minority write present: {}",
                    a.len(),
                    a.contains("minority-write")
                );
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "nodes did not converge after healing: {views:?}\n{}",
                c.logs_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn corrupt_rocksdb_file_stops_the_node_with_an_error_naming_it() -> Result<()> {
    let _g = serial();
    let mut c = Cluster::start(3)?;
    create_ds(&c, 3)?;
    assert_eq!(write_vdisks(running_clients(&c), "x", 300, 4).len(), 300);
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let f = (0..3).find(|i| c.nodes[*i].id != leader).expect("follower");
    c.stop(f)?; // clean stop flushes memtables into SST files

    let db = c.nodes[f].dir.join("metadata");
    let mut ssts: Vec<_> = std::fs::read_dir(&db)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .collect();
    ssts.sort_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let victim = ssts.pop().expect("an SST file after a clean stop");
    let mut bytes = std::fs::read(&victim)?;
    let mid = bytes.len() / 3;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, &bytes)?;

    c.spawn(f)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = c.nodes[f].child.as_mut().unwrap().try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!("node with a corrupt SST kept running\n{}", c.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    c.nodes[f].child = None;
    assert!(!status.success(), "must exit non-zero");
    let log = c.nodes[f].log();
    let file_name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        log.contains(&file_name),
        "error must name {file_name}:\n{log}"
    );
    assert!(
        log.to_lowercase().contains("corrupt"),
        "error must say corrupt:\n{log}"
    );

    // The other two keep serving.
    assert_eq!(write_vdisks(running_clients(&c), "y", 20, 2).len(), 20);
    Ok(())
}

#[test]
fn security_and_bad_input() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(1)?;

    // REST: no token, wrong token -> 401 problem documents; health is open.
    let r = c.raw(0, "GET", "/v1/datastores", &[], b"")?;
    assert_eq!(r.status, 401);
    assert!(r.content_type.starts_with("application/problem+json"));
    assert_eq!(r.body["code"], "CAIRN:API:Unauthorized");
    let r = c.raw(
        0,
        "GET",
        "/v1/datastores",
        &[("Authorization", "Bearer nope")],
        b"",
    )?;
    assert_eq!(r.status, 401);
    assert_eq!(c.raw(0, "GET", "/v1/health", &[], b"")?.status, 200);

    // Malformed JSON and a body of the wrong shape -> 4xx problem documents.
    let auth = format!("Bearer {}", c.token);
    let hdrs = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let r = c.raw(0, "POST", "/v1/datastores", &hdrs, b"{not json")?;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.content_type.starts_with("application/problem+json"));
    assert!(r.body["detail"]
        .as_str()
        .unwrap_or("")
        .contains("malformed JSON"));
    let r = c.raw(
        0,
        "POST",
        "/v1/datastores",
        &hdrs,
        br#"{"replication_factor": 2}"#,
    )?;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let r = c.raw(
        0,
        "POST",
        "/v1/datastores",
        &hdrs,
        br#"{"name": "x", "replication_factor": 7}"#,
    )?;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["code"], "CAIRN:META:Invalid");

    // Duplicate datastore through the CLI: clear error, nothing changed.
    let mut args = c.conn_args(0);
    args.extend([
        "-o".into(),
        "json".into(),
        "datastore".into(),
        "create".into(),
        "gold".into(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let first: Value = serde_json::from_str(&c.cli_ok(&argv)?)?;
    let out = c.cli(&argv)?;
    assert!(!out.status.success(), "duplicate create must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("CAIRN:META:Conflict"),
        "unclear error: {err}"
    );
    let list = c.get(0, "/v1/datastores")?.body;
    let golds: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["name"] == "gold")
        .collect();
    assert_eq!(golds.len(), 1);
    assert_eq!(
        golds[0]["id"], first["id"],
        "the duplicate must not replace the original"
    );

    // RPC: a node certificate from another cluster's CA is refused at the handshake.
    let other = c.root.path().join("other-cluster");
    c.cli_ok(&[
        "--data-dir",
        other.to_str().unwrap(),
        "cluster",
        "init",
        "--rpc-addr",
        "127.0.0.9:7100",
        "--api-addr",
        "127.0.0.9:8443",
    ])?;
    let foreign = cairn_rpc::pki::TlsPaths::new(&other).load_identity()?;
    let own = cairn_rpc::pki::TlsPaths::new(&c.nodes[0].dir).load_identity()?;
    let rpc = c.nodes[0].rpc_addr();
    let rt = tokio::runtime::Runtime::new()?;
    let status_with = |id: &cairn_rpc::pki::NodeIdentity| {
        let tls = cairn_rpc::tls::mtls_client_config(id).unwrap();
        rt.block_on(async {
            let ch =
                cairn_rpc::dial::mtls_channel(&rpc, tls, Some(Duration::from_secs(3))).unwrap();
            let mut client =
                cairn_api::rpc::v1::raft_transport_client::RaftTransportClient::new(ch);
            client
                .status(cairn_api::rpc::v1::NodeStatusRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(Box::new)
        })
    };
    assert!(
        status_with(&foreign).is_err(),
        "a certificate from another CA must be refused"
    );
    let ok = status_with(&own).map_err(|s| anyhow::anyhow!("{s}"))?;
    assert_eq!(ok.node_id, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        c.nodes[0].log().contains("TLS handshake failed"),
        "the refusal must be logged"
    );

    // A plaintext client on the RPC port: dropped, node unaffected.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&rpc)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00garbage")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n == 0 || buf[0] == 0x15,
            "plaintext must get a TLS alert or a closed connection"
        );
    }

    // Malformed protobuf inside a well-formed RPC: refused, logged, node unaffected.
    let tls = cairn_rpc::tls::mtls_client_config(&own)?;
    let bad = rt.block_on(async {
        let ch = cairn_rpc::dial::mtls_channel(&rpc, tls, Some(Duration::from_secs(3))).unwrap();
        let mut client = cairn_api::rpc::v1::raft_transport_client::RaftTransportClient::new(ch);
        client
            .send(cairn_api::rpc::v1::RaftBatch {
                format_version: 1,
                from_node: 99,
                messages: vec![vec![0xff, 0xff, 0xff, 0x01]],
                from_addr: String::new(),
            })
            .await
    });
    assert_eq!(
        bad.err().map(|s| s.code()),
        Some(tonic::Code::InvalidArgument)
    );
    assert!(status_with(&own).is_ok(), "node still serves RPC");

    // The same on the raw raft stream: a frame that is not a RaftBatch
    // closes that connection alone, with a log line.
    let tls = cairn_rpc::tls::mtls_client_config(&own)?;
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = cairn_rpc::dial::connect_alpn(
            &rpc,
            &tls,
            cairn_metadata::wire::ALPNS,
            Duration::from_secs(3),
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("the node must offer the raft stream"))?;
        s.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0x01]).await?;
        s.flush().await?;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("a bad raft frame must close its connection"))?
            .unwrap_or(0);
        anyhow::ensure!(n == 0, "the raft stream never answers");
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(status_with(&own).is_ok(), "node still serves RPC");
    let r = c.post(0, "/v1/datastores", &json!({ "name": "after-bad-input" }))?;
    assert_eq!(r.status, 201, "node still commits after bad input");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        c.nodes[0].log().contains("RPC refused"),
        "malformed RPC must be logged"
    );
    assert!(
        c.nodes[0].log().contains("dropping raft stream connection"),
        "a bad raft frame must be logged"
    );
    Ok(())
}

/// Mixed versions: a vdisk record written by a newer version (with a field
/// this build does not know) is read, resized through the real state
/// machine, and written back with the newer field intact.
#[test]
fn newer_record_field_survives_state_machine_read_modify_write() -> Result<()> {
    use cairn_api::metadata::v1::{command::Op, Command, ResizeVdisk, VdiskRecord};
    use cairn_metadata::state::{apply, vdisk_key, Overlay};
    use prost::Message;

    #[derive(Clone, PartialEq, prost::Message)]
    struct VdiskRecordV2 {
        #[prost(uint32, tag = "1")]
        format_version: u32,
        #[prost(string, tag = "3")]
        name: String,
        #[prost(string, tag = "4")]
        datastore_id: String,
        #[prost(uint64, tag = "5")]
        size_bytes: u64,
        #[prost(string, tag = "40")]
        qos_policy: String,
    }
    let v2 = VdiskRecordV2 {
        format_version: 2,
        name: "vm".into(),
        datastore_id: "ds".into(),
        size_bytes: 4096,
        qos_policy: "gold-iops".into(),
    };
    let mut state = std::collections::BTreeMap::new();
    state.insert(vdisk_key("ds", "vm"), v2.encode_to_vec());

    // Current code reads it.
    let read = VdiskRecord::decode(state[&vdisk_key("ds", "vm")].as_slice())?;
    assert_eq!(read.size_bytes, 4096);

    let cmd = Command {
        op: Some(Op::ResizeVdisk(ResizeVdisk {
            datastore: "ds".into(),
            name: "vm".into(),
            size_bytes: 8192,
        })),
        ..Default::default()
    };
    let mut out = Overlay::default();
    let res = apply(&state, &mut out, &cmd).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(res.error_code, "");
    let written = out
        .writes
        .get(&vdisk_key("ds", "vm"))
        .cloned()
        .flatten()
        .expect("record rewritten");
    let back = VdiskRecordV2::decode(written.as_slice())?;
    assert_eq!(back.size_bytes, 8192);
    assert_eq!(back.qos_policy, "gold-iops", "the newer field must survive");
    assert_eq!(back.format_version, 2);
    Ok(())
}

/// The contract in `api/openapi.yaml` matches the live server: every
/// documented path and method is routed (not the 404 fallback, not 405), and
/// every documented path but health refuses requests without the token.
#[test]
fn openapi_contract_matches_the_server() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(1)?;
    let mut ops: Vec<(String, String)> = Vec::new();
    let mut path: Option<String> = None;
    for line in cairn_api::OPENAPI_YAML.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if line.starts_with("  ") && !line.starts_with("    ") {
            path = None;
        } else if let (Some(p), Some(m)) = (
            &path,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) {
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                ops.push((m.to_uppercase(), p.clone()));
            }
        }
    }
    assert!(
        ops.len() >= 15,
        "parsed too few operations from openapi.yaml: {ops:?}"
    );
    let auth = format!("Bearer {}", c.token);
    for (method, p) in &ops {
        let concrete = p
            .replace("{ds}", "no-such-ds")
            .replace("{name}", "no-such-vdisk")
            .replace("{id}", "999")
            .replace("{snap}", "no-such-snap")
            .replace("{task}", "no-such-task")
            .replace("{iqn}", "iqn.2000-01.com.example:no-such-target")
            .replace("{lun}", "0");
        let r = c.raw(
            0,
            method,
            &concrete,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            b"{}",
        )?;
        let fallback = r.body["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("no such endpoint"));
        assert!(
            !fallback && r.status != 405,
            "{method} {p} is documented but not routed: {} {}",
            r.status,
            r.body
        );
        if p != "/v1/health" {
            let r = c.raw(
                0,
                method,
                &concrete,
                &[("Content-Type", "application/json")],
                b"{}",
            )?;
            assert_eq!(r.status, 401, "{method} {p} must require the token");
        }
    }
    Ok(())
}

/// A power loss of the whole cluster, not only a kill: every node's folder
/// (RocksDB included) on `cairn-lazyfs`. Writers keep creating vdisks
/// through every node while all three are killed with -9; then each node
/// loses some of what it had not synced, its own way. Every creation
/// acknowledged before the kill must be on every node after the restart.
/// (A kill -9 alone cannot show a missing fsync: the page cache survives
/// it.)
#[test]
fn a_whole_cluster_power_loss_keeps_every_acknowledged_metadata_write() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let _g = serial();
    let mut c = Cluster::start(3)?;
    let mut mounts = Vec::new();
    for i in 0..3 {
        mounts.push(c.put_on_lazyfs(i)?);
    }
    c.wait_leader(Duration::from_secs(30))?;
    create_ds(&c, 1)?;
    let mut acked = write_vdisks(running_clients(&c), "before", 60, 3);
    assert_eq!(acked.len(), 60, "creations failed before any fault");

    // Writers still at work when the power goes.
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(BTreeSet::new()));
    let writer = {
        let (stop, live, clients) = (stop.clone(), live.clone(), running_clients(&c));
        std::thread::spawn(move || {
            let mut k = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("during{k}");
                let body = json!({ "name": name, "size_bytes": 1u64 << 30 });
                if matches!(clients[k % clients.len()].post(VDISKS, &body), Ok(r) if r.status == 201)
                {
                    live.lock().unwrap().insert(name);
                }
                k += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..3 {
        c.kill9(i);
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let during = live.lock().unwrap().len();
    assert!(
        during > 0,
        "no creation was acknowledged while the writers ran"
    );
    acked.extend(live.lock().unwrap().iter().cloned());

    let mut again = Vec::new();
    for (i, fs) in mounts.into_iter().enumerate() {
        again.push(fs.power_cycle(Some(20 + i as u64))?.0);
    }
    for i in 0..3 {
        c.spawn(i)?;
    }
    c.wait_leader(Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..3 {
        loop {
            let missing: Vec<String> = match names_on(&c, i) {
                Ok(names) => acked.difference(&names).cloned().collect(),
                Err(e) => vec![e.to_string()],
            };
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node index {i} lost acknowledged creations after a power loss: {missing:?}\n{}",
                c.logs_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!(
        "{} creations acknowledged, {during} of them while the power went",
        acked.len()
    );
    Ok(())
}
