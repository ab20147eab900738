//! iSCSI targets in the replicated state (`t/<iqn>` → `IscsiTargetRecord`):
//! the naming and CHAP rules and the four commands that change targets.
//!
//! Every rule is checked here, inside the pure state machine, rather than in
//! the REST layer: whichever path proposes a command (REST on any node, a
//! later upgrade tool, a test), nothing invalid can be stored, and every
//! replica decides identically. Error messages name lengths, never secrets.

use cairn_api::metadata::v1::{
    CommandResult, CreateIscsiTarget, DeleteIscsiTarget, IscsiLun, IscsiTargetRecord, MapIscsiLun,
    UnmapIscsiLun,
};
use cairn_api::record::Record;
use cairn_util::error_code::{codes, ErrorCode};
use prost::Message;

use crate::state::{vdisk_by_id, Overlay, StateView};
use crate::MetaError;

pub const PREFIX_ISCSI_TARGET: &[u8] = b"t/";

pub fn target_key(iqn: &str) -> Vec<u8> {
    [PREFIX_ISCSI_TARGET, iqn.as_bytes()].concat()
}

/// Longest iSCSI name (RFC 7143 6.1: 223 bytes).
pub const MAX_NAME_BYTES: usize = 223;
/// Highest LUN: single-level peripheral addressing (SAM-5 4.7.3), which
/// every initiator understands.
pub const MAX_LUN: u64 = 255;
/// CHAP secrets: at least 12 bytes (96 bits, RFC 7143 12.1.3: less needs
/// IPsec, which Cairn does not do), at most 16 (128 bits: what RFC 7143
/// requires every implementation to accept, and the Windows initiator's limit).
pub const MIN_SECRET_BYTES: usize = 12;
pub const MAX_SECRET_BYTES: usize = 16;
/// CHAP user names and initiator allow lists stay small.
pub const MAX_CHAP_USER_BYTES: usize = 255;
pub const MAX_ALLOWED_INITIATORS: usize = 256;

/// The normal form of an iSCSI name (RFC 3722 folds case): `iqn.` names in
/// lower case, the hex of `eui.` and `naa.` names in upper case. Comparisons
/// and storage use this form; validation is separate ([`validate_name`]).
pub fn normalize_name(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    for prefix in ["eui.", "naa."] {
        if let Some(hex) = lower.strip_prefix(prefix) {
            return format!("{prefix}{}", hex.to_ascii_uppercase());
        }
    }
    lower
}

/// Checks a normalised iSCSI name (RFC 7143 4.2.7.2 / 6.1): `iqn.YYYY-MM.`
/// reversed domain name, optionally `:` and a suffix; `eui.` and 16 hex
/// digits; or `naa.` and 16 or 32 hex digits. Only ASCII is accepted (the
/// RFC allows more after stringprep; hosts and tools use ASCII).
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "invalid {what} {name:?}: {why} (expected iqn.YYYY-MM.reversed.domain[:name] \
             in lower case, or eui. and 16 hex digits)"
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return bad("longer than 223 bytes");
    }
    if name != normalize_name(name) {
        return bad("not in normal form");
    }
    let hex_of = |rest: &str, lens: &[usize]| {
        lens.contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if let Some(rest) = name.strip_prefix("eui.") {
        return if hex_of(rest, &[16]) {
            Ok(())
        } else {
            bad("an eui. name has exactly 16 hex digits")
        };
    }
    if let Some(rest) = name.strip_prefix("naa.") {
        return if hex_of(rest, &[16, 32]) {
            Ok(())
        } else {
            bad("an naa. name has 16 or 32 hex digits")
        };
    }
    let Some(rest) = name.strip_prefix("iqn.") else {
        return bad("must start with iqn., eui. or naa.");
    };
    let date = rest.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        date.get(r)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let month_ok = rest
        .get(5..7)
        .and_then(|m| m.parse::<u8>().ok())
        .is_some_and(|m| (1..=12).contains(&m));
    if !(digits(0..4) && date.get(4) == Some(&b'-') && digits(5..7) && month_ok)
        || date.get(7) != Some(&b'.')
    {
        return bad("the date must be YYYY-MM followed by a dot");
    }
    let after_date = &rest[8..];
    let (domain, suffix) = match after_date.split_once(':') {
        Some((d, s)) => (d, Some(s)),
        None => (after_date, None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !domain.split('.').all(label_ok) {
        return bad("the naming authority must be a reversed domain name (labels of a-z 0-9 -)");
    }
    if let Some(s) = suffix {
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
        if !ok {
            return bad("the part after ':' must be non-empty and use a-z 0-9 - . :");
        }
    }
    Ok(())
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn check_chap_pair(kind: &str, user: &str, secret: &str) -> Result<(), String> {
    if user.is_empty() != secret.is_empty() {
        return Err(format!("{kind} CHAP needs both a user name and a secret"));
    }
    if user.is_empty() {
        return Ok(());
    }
    if user.len() > MAX_CHAP_USER_BYTES || !printable(user) {
        return Err(format!(
            "{kind} CHAP user name must be 1-{MAX_CHAP_USER_BYTES} printable ASCII characters without spaces"
        ));
    }
    // Only the length goes into the message: the secret itself never does.
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&secret.len()) {
        return Err(format!(
            "{kind} CHAP secret is {} bytes; it must be {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes \
             (RFC 7143 12.1.3: shorter secrets fall to offline dictionary attacks)",
            secret.len()
        ));
    }
    if !printable(secret) {
        return Err(format!(
            "{kind} CHAP secret must be printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// The CHAP rules of a target: pairs complete, secret lengths, mutual only
/// with one-way, and the two directions never sharing a secret (RFC 7143
/// 12.1.3 forbids it: an attacker could replay the target's challenge).
pub fn validate_chap(t: &IscsiTargetRecord) -> Result<(), String> {
    check_chap_pair("one-way", &t.chap_user, &t.chap_secret)?;
    check_chap_pair("mutual", &t.mutual_user, &t.mutual_secret)?;
    if !t.mutual_user.is_empty() && t.chap_user.is_empty() {
        return Err("mutual CHAP needs one-way CHAP too (chap_user and chap_secret)".into());
    }
    if !t.mutual_secret.is_empty() && t.mutual_secret == t.chap_secret {
        return Err("the mutual CHAP secret must differ from the one-way secret".into());
    }
    Ok(())
}

fn fail(code: ErrorCode, message: impl Into<String>) -> CommandResult {
    CommandResult {
        error_code: code.code.to_string(),
        error_message: message.into(),
        ..Default::default()
    }
}

/// Checks one LUN against the target's other LUNs and the state: number in
/// range and free, vdisk existing and not already a LUN of this target.
fn check_lun(
    view: &dyn StateView,
    lun: &IscsiLun,
    others: &[IscsiLun],
) -> Result<Option<CommandResult>, MetaError> {
    if lun.lun > MAX_LUN {
        return Ok(Some(fail(
            codes::INVALID,
            format!("LUN {} is out of range: use 0-{MAX_LUN}", lun.lun),
        )));
    }
    if others.iter().any(|o| o.lun == lun.lun) {
        return Ok(Some(fail(
            codes::CONFLICT,
            format!("LUN {} is mapped twice", lun.lun),
        )));
    }
    if lun.vdisk_id.is_empty() || vdisk_by_id(view, &lun.vdisk_id)?.is_none() {
        return Ok(Some(fail(
            codes::INVALID,
            format!("LUN {}: vdisk {:?} does not exist", lun.lun, lun.vdisk_id),
        )));
    }
    if let Some(o) = others.iter().find(|o| o.vdisk_id == lun.vdisk_id) {
        // One device behind two LUNs of a target looks like two disks to a
        // host, which then writes to "both" as if they were independent.
        return Ok(Some(fail(
            codes::CONFLICT,
            format!(
                "vdisk {} is already LUN {} of this target",
                lun.vdisk_id, o.lun
            ),
        )));
    }
    Ok(None)
}

pub fn create(
    view: &dyn StateView,
    out: &mut Overlay,
    c: &CreateIscsiTarget,
    now: u64,
) -> Result<CommandResult, MetaError> {
    let mut t = c.target.clone().unwrap_or_default();
    if let Err(e) = validate_name("target name", &t.iqn).and_then(|()| validate_chap(&t)) {
        return Ok(fail(codes::INVALID, e));
    }
    if t.allowed_initiators.len() > MAX_ALLOWED_INITIATORS {
        return Ok(fail(
            codes::INVALID,
            format!("at most {MAX_ALLOWED_INITIATORS} allowed initiators"),
        ));
    }
    for (i, name) in t.allowed_initiators.iter().enumerate() {
        if let Err(e) = validate_name("initiator name", name) {
            return Ok(fail(codes::INVALID, e));
        }
        if t.allowed_initiators[..i].contains(name) {
            return Ok(fail(
                codes::INVALID,
                format!("initiator {name:?} is listed twice"),
            ));
        }
    }
    for (i, lun) in t.luns.iter().enumerate() {
        if let Some(r) = check_lun(view, lun, &t.luns[..i])? {
            return Ok(r);
        }
    }
    let key = target_key(&t.iqn);
    if view.get(&key)?.is_some() {
        return Ok(fail(
            codes::CONFLICT,
            format!("iSCSI target {:?} already exists", t.iqn),
        ));
    }
    t.format_version = cairn_api::FORMAT_VERSION;
    t.created_unix_ms = now;
    let bytes = t.encode_to_vec();
    out.put(key, bytes.clone());
    Ok(CommandResult {
        record: bytes,
        ..Default::default()
    })
}

fn load(
    view: &dyn StateView,
    iqn: &str,
) -> Result<Result<Record<IscsiTargetRecord>, CommandResult>, MetaError> {
    Ok(match view.get(&target_key(iqn))? {
        Some(b) => Ok(Record::<IscsiTargetRecord>::decode(&b)?),
        None => Err(fail(
            codes::NOT_FOUND,
            format!("iSCSI target {iqn:?} not found"),
        )),
    })
}

pub fn delete(
    view: &dyn StateView,
    out: &mut Overlay,
    d: &DeleteIscsiTarget,
) -> Result<CommandResult, MetaError> {
    if let Err(r) = load(view, &d.iqn)? {
        return Ok(r);
    }
    out.delete(target_key(&d.iqn));
    Ok(CommandResult::default())
}

pub fn map_lun(
    view: &dyn StateView,
    out: &mut Overlay,
    m: &MapIscsiLun,
) -> Result<CommandResult, MetaError> {
    let mut t = match load(view, &m.iqn)? {
        Ok(t) => t,
        Err(r) => return Ok(r),
    };
    let lun = m.lun.clone().unwrap_or_default();
    if let Some(r) = check_lun(view, &lun, &t.msg.luns)? {
        return Ok(r);
    }
    t.msg.luns.push(lun);
    t.msg.luns.sort_by_key(|l| l.lun);
    let bytes = t.encode();
    out.put(target_key(&m.iqn), bytes.clone());
    Ok(CommandResult {
        record: bytes,
        ..Default::default()
    })
}

pub fn unmap_lun(
    view: &dyn StateView,
    out: &mut Overlay,
    u: &UnmapIscsiLun,
) -> Result<CommandResult, MetaError> {
    let mut t = match load(view, &u.iqn)? {
        Ok(t) => t,
        Err(r) => return Ok(r),
    };
    let before = t.msg.luns.len();
    t.msg.luns.retain(|l| l.lun != u.lun);
    if t.msg.luns.len() == before {
        return Ok(fail(
            codes::NOT_FOUND,
            format!("iSCSI target {:?} has no LUN {}", u.iqn, u.lun),
        ));
    }
    let bytes = t.encode();
    out.put(target_key(&u.iqn), bytes.clone());
    Ok(CommandResult {
        record: bytes,
        ..Default::default()
    })
}

/// The first (target, LUN) that exports `vdisk_id`, if any: a vdisk that a
/// host may be using is not deleted under it.
pub fn exported_as(
    view: &dyn StateView,
    vdisk_id: &str,
) -> Result<Option<(String, u64)>, MetaError> {
    for (_, v) in view.scan(PREFIX_ISCSI_TARGET)? {
        let t = Record::<IscsiTargetRecord>::decode(&v)?;
        if let Some(l) = t.msg.luns.iter().find(|l| l.vdisk_id == vdisk_id) {
            return Ok(Some((t.msg.iqn.clone(), l.lun)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "iqn.2026-11.io.cairn:demo",
            "iqn.2026-11.io.cairn",
            "iqn.1994-05.com.redhat:5a6f7e8d9c",
            "iqn.2004-10.org.debian:01:abc.def-1",
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
        ] {
            assert_eq!(validate_name("n", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "iqn.2026-13.io.cairn:x",
            "iqn.2026-1.io.cairn:x",
            "iqn.26-11.io.cairn",
            "iqn.2026-11io.cairn",
            "iqn.2026-11.:x",
            "iqn.2026-11.io..cairn",
            "iqn.2026-11.io.cairn:",
            "iqn.2026-11.io.cairn:a b",
            "iqn.2026-11.io.cairn:A",
            "iqn.2026-11.io_cairn",
            "eui.0200",
            "eui.02004567a425678d",
            "target1",
            "iqn.2026-11",
        ] {
            assert!(validate_name("n", bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("iqn.2026-11.io.cairn:{}", "a".repeat(210));
        assert!(validate_name("n", &long).is_err());
        assert_eq!(
            normalize_name("IQN.2026-11.IO.Cairn:Demo"),
            "iqn.2026-11.io.cairn:demo"
        );
        assert_eq!(
            normalize_name("eui.02004567a425678d"),
            "eui.02004567A425678D"
        );
    }

    fn chap(u: &str, s: &str, mu: &str, ms: &str) -> Result<(), String> {
        validate_chap(&IscsiTargetRecord {
            chap_user: u.into(),
            chap_secret: s.into(),
            mutual_user: mu.into(),
            mutual_secret: ms.into(),
            ..Default::default()
        })
    }

    #[test]
    fn chap_rules() {
        assert!(chap("", "", "", "").is_ok());
        assert!(chap("u", "twelve-bytes", "", "").is_ok());
        assert!(chap("u", "sixteen-bytes-ok", "t", "another-secret").is_ok());
        let short = chap("u", "short", "", "");
        assert!(short
            .as_ref()
            .is_err_and(|e| e.contains("5 bytes") && !e.contains("short\"")));
        assert!(chap("u", "seventeen-bytes-x", "", "").is_err());
        assert!(chap("u", "", "", "").is_err());
        assert!(chap("", "twelve-bytes", "", "").is_err());
        assert!(chap("", "", "t", "another-secret").is_err(), "mutual alone");
        assert!(
            chap("u", "twelve-bytes", "t", "twelve-bytes").is_err(),
            "same secret"
        );
        assert!(chap("u", "twelve bytes", "", "").is_err(), "space");
        assert!(chap("u u", "twelve-bytes", "", "").is_err());
    }
}
