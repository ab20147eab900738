//! Management of iSCSI targets (issue 5) on real `cairn` processes: the
//! CLI and the REST API create, list, map, unmap and delete targets; every
//! validation rule answers with its stable code; and no CHAP secret ever
//! leaves the cluster — not in an answer, not in CLI output, not in a log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{ensure, Result};
use cairn_tests::{serial, Cluster};
use serde_json::{json, Value};

const TARGETS: &str = "/v1/iscsi/targets";
// Distinctive, so that a match anywhere is certainly a leak.
const SECRET: &str = "Cli-Secret-q7Zx";
const MUTUAL: &str = "Mut-Secret-k3Wv";
const REST_SECRET: &str = "Rest-Secret-9pL";
const SECRETS: [&str; 3] = [SECRET, MUTUAL, REST_SECRET];

fn no_secret(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} leaks a CHAP secret: {text}");
    }
}

/// `cairn <conn> <args>` against node 0; (success, stdout, stderr).
fn cli(c: &Cluster, args: &[&str]) -> Result<(bool, String, String)> {
    let mut all: Vec<String> = c.conn_args(0);
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = c.cli(&refs)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    no_secret(&format!("cairn {args:?} stdout"), &stdout);
    no_secret(&format!("cairn {args:?} stderr"), &stderr);
    Ok((out.status.success(), stdout, stderr))
}

/// POST a target; returns (status, code, body).
fn create(c: &Cluster, body: Value) -> Result<(u16, String, Value)> {
    let r = c.post(0, TARGETS, &body)?;
    no_secret("create answer", &r.body.to_string());
    let code = r.body["code"].as_str().unwrap_or("").to_string();
    Ok((r.status, code, r.body))
}

#[test]
fn iscsi_targets_are_managed_without_leaking_secrets() -> Result<()> {
    let _g = serial();
    let c = Cluster::start(1)?;
    let vm0 = c.make_vdisk("ds", 1, "vm0", 1 << 30, 0)?;
    c.make_vdisk("ds", 1, "vm1", 1 << 30, 0)?;
    // The same name in a second datastore: a bare "vm0" is then ambiguous.
    c.make_vdisk("ds2", 1, "vm0", 1 << 30, 0)?;

    // The node knows its portal, from the config the harness wrote.
    let cfg = std::fs::read_to_string(c.nodes[0].dir.join("cairn.toml"))?;
    ensure!(
        cfg.contains(&format!("iscsi_addr = \"{}\"", c.nodes[0].iscsi_addr())),
        "config without iscsi_addr: {cfg}"
    );
    let nodes = c.get(0, "/v1/nodes")?;
    assert_eq!(
        nodes.body[0]["iscsi_addr"].as_str(),
        Some(c.nodes[0].iscsi_addr().as_str()),
        "{}",
        nodes.body
    );

    // ---- CLI create: secrets from files, LUNs by datastore/name and by a unique name ----
    let secret_file = c.root.path().join("chap.secret");
    let mutual_file = c.root.path().join("mutual.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n"))?;
    std::fs::write(&mutual_file, MUTUAL)?;
    let cli_iqn = "iqn.2026-11.io.cairn:cli";
    let (ok, out, err) = cli(
        &c,
        &[
            "iscsi",
            "target",
            "create",
            cli_iqn,
            "--lun",
            "0=ds/vm0",
            "--lun",
            "1=vm1",
            "--chap-user",
            "host1",
            "--chap-secret-file",
            secret_file.to_str().unwrap(),
            "--mutual-user",
            "cairn",
            "--mutual-secret-file",
            mutual_file.to_str().unwrap(),
            "--allow",
            "iqn.1994-05.com.redhat:client1",
        ],
    )?;
    assert!(ok, "cli create failed: {err}");
    assert!(out.contains(cli_iqn) && out.contains("host1"), "{out}");

    // ---- REST create: name normalised, vdisk by id, one-way CHAP ----
    let (status, _, body) = create(
        &c,
        json!({
            "iqn": "IQN.2026-11.IO.Cairn:REST",
            "luns": [{ "lun": 3, "vdisk": vm0 }],
            "chap_user": "host2",
            "chap_secret": REST_SECRET,
        }),
    )?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["iqn"], "iqn.2026-11.io.cairn:rest");
    assert_eq!(body["chap"], true);
    assert_eq!(body["chap_user"], "host2");
    assert_eq!(body["mutual_chap"], false);
    assert_eq!(body["luns"][0]["vdisk_id"], vm0.as_str());
    assert_eq!(body["luns"][0]["vdisk"], "vm0");
    assert_eq!(body["luns"][0]["datastore"], "ds");
    assert_eq!(body["portals"], json!([c.nodes[0].iscsi_addr()]));

    // ---- list and get: both targets, no secret in any form ----
    let list = c.get(0, TARGETS)?;
    assert_eq!(list.status, 200, "{}", list.body);
    no_secret("list", &list.body.to_string());
    let iqns: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["iqn"].as_str())
        .collect();
    assert_eq!(iqns, vec![cli_iqn, "iqn.2026-11.io.cairn:rest"]);
    let t = &list.body[0];
    assert_eq!(t["chap"], true);
    assert_eq!(t["mutual_chap"], true);
    assert_eq!(t["mutual_user"], "cairn");
    assert_eq!(
        t["allowed_initiators"],
        json!(["iqn.1994-05.com.redhat:client1"])
    );
    let luns: Vec<(u64, &str)> = t["luns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["lun"].as_u64().unwrap(), l["vdisk"].as_str().unwrap()))
        .collect();
    assert_eq!(luns, vec![(0, "vm0"), (1, "vm1")]);
    let one = c.get(0, &format!("{TARGETS}/{cli_iqn}"))?;
    assert_eq!(one.status, 200, "{}", one.body);
    no_secret("get", &one.body.to_string());
    for args in [
        vec!["iscsi", "target", "list"],
        vec!["-o", "json", "iscsi", "target", "list"],
        vec!["iscsi", "target", "get", cli_iqn],
    ] {
        let (ok, out, err) = cli(&c, &args)?;
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains(cli_iqn), "{args:?}: {out}");
    }
    let (_, table, _) = cli(&c, &["iscsi", "target", "list"])?;
    assert!(table.contains("0=ds/vm0,1=ds/vm1"), "{table}");

    // ---- validation: each rule, its code, no secret echoed ----
    let base = |iqn: &str| json!({ "iqn": iqn, "luns": [{ "lun": 0, "vdisk": "vm1" }] });
    let with = |mut v: Value, k: &str, x: Value| {
        v[k] = x;
        v
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("bad name", base("target1"), 422, "CAIRN:META:Invalid"),
        (
            "bad date",
            base("iqn.2026-13.io.cairn:x"),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "short secret",
            with(
                with(base("iqn.2026-11.io.cairn:x"), "chap_user", json!("u")),
                "chap_secret",
                json!("short-1"),
            ),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "secret without user",
            with(
                base("iqn.2026-11.io.cairn:x"),
                "chap_secret",
                json!(REST_SECRET),
            ),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "mutual without one-way",
            with(
                with(base("iqn.2026-11.io.cairn:x"), "mutual_user", json!("t")),
                "mutual_secret",
                json!(MUTUAL),
            ),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "same secret both ways",
            json!({ "iqn": "iqn.2026-11.io.cairn:x", "chap_user": "u", "chap_secret": REST_SECRET,
                    "mutual_user": "t", "mutual_secret": REST_SECRET }),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "duplicate LUN",
            json!({ "iqn": "iqn.2026-11.io.cairn:x",
                    "luns": [{ "lun": 0, "vdisk": "vm1" }, { "lun": 0, "vdisk": "ds2/vm0" }] }),
            409,
            "CAIRN:META:Conflict",
        ),
        (
            "one vdisk twice",
            json!({ "iqn": "iqn.2026-11.io.cairn:x",
                    "luns": [{ "lun": 0, "vdisk": "vm1" }, { "lun": 1, "vdisk": "ds/vm1" }] }),
            409,
            "CAIRN:META:Conflict",
        ),
        (
            "LUN out of range",
            json!({ "iqn": "iqn.2026-11.io.cairn:x", "luns": [{ "lun": 256, "vdisk": "vm1" }] }),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "unknown vdisk",
            json!({ "iqn": "iqn.2026-11.io.cairn:x", "luns": [{ "lun": 0, "vdisk": "nope" }] }),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "ambiguous vdisk name",
            json!({ "iqn": "iqn.2026-11.io.cairn:x", "luns": [{ "lun": 0, "vdisk": "vm0" }] }),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "bad initiator name",
            with(
                base("iqn.2026-11.io.cairn:x"),
                "allowed_initiators",
                json!(["host a"]),
            ),
            422,
            "CAIRN:META:Invalid",
        ),
        (
            "duplicate target",
            base(cli_iqn),
            409,
            "CAIRN:META:Conflict",
        ),
        (
            "unknown field",
            with(base("iqn.2026-11.io.cairn:x"), "chap", json!(true)),
            422,
            "CAIRN:API:BadRequest",
        ),
    ];
    for (what, body, want_status, want_code) in cases {
        let (status, code, answer) = create(&c, body)?;
        assert_eq!(
            (status, code.as_str()),
            (want_status, want_code),
            "{what}: {answer}"
        );
    }
    let (_, _, answer) = create(
        &c,
        json!({ "iqn": "iqn.2026-11.io.cairn:x", "chap_user": "u", "chap_secret": "short-1" }),
    )?;
    assert!(
        answer["detail"].as_str().unwrap().contains("7 bytes")
            && !answer.to_string().contains("short-1"),
        "the detail names the length, not the secret: {answer}"
    );
    // Nothing was created by the refused requests.
    assert_eq!(c.get(0, TARGETS)?.body.as_array().map(Vec::len), Some(2));

    // The CLI reports the same errors, and its own.
    let (ok, _, err) = cli(
        &c,
        &["iscsi", "target", "create", "bad-name", "--lun", "0=vm1"],
    )?;
    assert!(!ok && err.contains("CAIRN:META:Invalid"), "{err}");
    let (ok, _, err) = cli(
        &c,
        &[
            "iscsi",
            "target",
            "create",
            "iqn.2026-11.io.cairn:y",
            "--lun",
            "0=vm1",
            "--chap-user",
            "u",
            "--chap-secret",
            "tooshort",
        ],
    )?;
    assert!(
        !ok && err.contains("8 bytes") && !err.contains("tooshort"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &c,
        &[
            "iscsi",
            "target",
            "create",
            "iqn.2026-11.io.cairn:y",
            "--lun",
            "zero=vm1",
        ],
    )?;
    assert!(!ok && err.contains("must be a number"), "{err}");

    // ---- LUN mapping ----
    let rest_iqn = "iqn.2026-11.io.cairn:rest";
    let r = c.post(
        0,
        &format!("{TARGETS}/{rest_iqn}/luns"),
        &json!({ "lun": 4, "vdisk": "ds2/vm0" }),
    )?;
    assert_eq!(r.status, 201, "{}", r.body);
    no_secret("map answer", &r.body.to_string());
    assert_eq!(r.body["luns"].as_array().map(Vec::len), Some(2));
    let r = c.post(
        0,
        &format!("{TARGETS}/{rest_iqn}/luns"),
        &json!({ "lun": 4, "vdisk": "vm1" }),
    )?;
    assert_eq!(r.status, 409, "LUN taken: {}", r.body);
    let r = c.post(
        0,
        &format!("{TARGETS}/iqn.2026-11.io.cairn:none/luns"),
        &json!({ "lun": 0, "vdisk": "vm1" }),
    )?;
    assert_eq!(r.status, 404, "{}", r.body);
    let (ok, out, err) = cli(&c, &["iscsi", "target", "map", rest_iqn, "--lun", "5=vm1"])?;
    assert!(ok && out.contains("5=ds/vm1"), "{out} {err}");
    let (ok, _, err) = cli(&c, &["iscsi", "target", "unmap", rest_iqn, "--lun", "5"])?;
    assert!(ok, "{err}");
    let r = c.request(0, "DELETE", &format!("{TARGETS}/{rest_iqn}/luns/4"), None)?;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = c.request(0, "DELETE", &format!("{TARGETS}/{rest_iqn}/luns/4"), None)?;
    assert_eq!(r.status, 404, "{}", r.body);

    // ---- a mapped vdisk is not deleted under its hosts ----
    let r = c.request(0, "DELETE", "/v1/datastores/ds/vdisks/vm1", None)?;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap().contains(cli_iqn),
        "{}",
        r.body
    );

    // ---- delete ----
    let (ok, out, err) = cli(&c, &["iscsi", "target", "delete", cli_iqn])?;
    assert!(ok && out.contains("deleted"), "{out} {err}");
    let (ok, _, err) = cli(&c, &["iscsi", "target", "delete", cli_iqn])?;
    assert!(!ok && err.contains("CAIRN:META:NotFound"), "{err}");
    let r = c.request(0, "DELETE", &format!("{TARGETS}/{rest_iqn}"), None)?;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(c.get(0, TARGETS)?.body, json!([]));
    assert_eq!(c.get(0, &format!("{TARGETS}/{rest_iqn}"))?.status, 404);
    let r = c.request(0, "DELETE", "/v1/datastores/ds/vdisks/vm1", None)?;
    assert_eq!(r.status, 204, "unmapped vdisk deletes: {}", r.body);

    // ---- and the logs never saw a secret ----
    for n in &c.nodes {
        no_secret(&format!("node {} log", n.id), &n.log());
    }
    Ok(())
}
