//! The login phase (RFC 7143 6.3): security negotiation with CHAP, then
//! operational negotiation, ending in a session (new, reinstated or joined
//! by another connection) or a login response with an error status and a
//! closed connection.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::chap::{self, Challenge};
use crate::pdu::{self, op, Pdu, ReadLimits};
use crate::server::Shared;
use crate::session::{Params, Session, SessionKind};
use crate::target::TargetConfig;

/// What we declare we receive per PDU in the full feature phase.
pub const OUR_MAX_RECV_DATA_SEGMENT: u32 = 256 * 1024;
/// Largest burst (R2T or Data-In sequence) we agree to.
pub const OUR_MAX_BURST: u32 = 1024 * 1024;
const OUR_FIRST_BURST: u32 = 256 * 1024;
const OUR_MAX_OUTSTANDING_R2T: u32 = 8;
const OUR_MAX_CONNECTIONS: u16 = 4;
/// Login PDUs are small; this bounds what a peer can make us buffer before
/// it has authenticated (text keys spanning several PDUs included).
const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Login status classes and details (RFC 7143 11.13.5).
mod status {
    pub const AUTH_FAILED: u16 = 0x0201;
    pub const FORBIDDEN: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    pub const NO_SESSION: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
}

/// A login that succeeded.
pub struct LoggedIn {
    pub session: Arc<Session>,
    /// This connection's parameters (digests, PDU sizes).
    pub params: Params,
    pub cid: u16,
    /// The StatSN of the first full-feature response.
    pub statsn: u32,
}

/// Why a login ended without a session (already answered on the wire when
/// a status is given).
#[derive(Debug)]
pub struct LoginFailed {
    pub status: Option<u16>,
    pub reason: String,
}

fn fail(status: u16, reason: impl Into<String>) -> LoginFailed {
    LoginFailed {
        status: Some(status),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod offered yet.
    Start,
    /// AuthMethod=None agreed.
    Open,
    /// AuthMethod=CHAP agreed, waiting for CHAP_A.
    ChapMethod,
    /// Challenge sent, waiting for CHAP_N/CHAP_R.
    ChapChallenged,
    /// The initiator proved itself (and we proved ourselves if asked).
    Done,
}

struct State<'a> {
    shared: &'a Shared,
    first: Option<First>,
    target: Option<TargetConfig>,
    kind: SessionKind,
    auth: Auth,
    challenge: Option<Challenge>,
    params: Params,
    declared: bool,
    sent_tpgt: bool,
    text: Vec<u8>,
}

/// Fields of the first login request that later ones must repeat.
#[derive(Clone)]
struct First {
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    cmdsn: u32,
    statsn: u32,
    initiator: String,
}

/// Runs the login phase on a fresh connection.
pub async fn login(shared: &Shared, stream: &mut TcpStream) -> Result<LoggedIn, LoginFailed> {
    let mut st = State {
        shared,
        first: None,
        target: None,
        kind: SessionKind::Normal,
        auth: Auth::Start,
        challenge: None,
        params: Params::default(),
        declared: false,
        sent_tpgt: false,
        text: Vec::new(),
    };
    loop {
        let limits = ReadLimits {
            max_data: 8192,
            header_digest: false,
            data_digest: false,
        };
        let req = pdu::read_pdu(stream, limits)
            .await
            .map_err(|e| LoginFailed {
                status: None,
                reason: format!("reading a login request: {e}"),
            })?;
        match st.step(&req).await {
            Ok(Step::Continue(resp)) => send(stream, &resp).await?,
            Ok(Step::Done(resp, done)) => {
                send(stream, &resp).await?;
                return Ok(*done);
            }
            Err(f) => {
                if let Some(code) = f.status {
                    let resp = st.response(&req, 0, false, Vec::new(), code, 0);
                    let _ = send(stream, &resp).await;
                }
                return Err(f);
            }
        }
    }
}

async fn send(stream: &mut TcpStream, p: &Pdu) -> Result<(), LoginFailed> {
    stream
        .write_all(&p.encode(false, false))
        .await
        .map_err(|e| LoginFailed {
            status: None,
            reason: format!("writing a login response: {e}"),
        })
}

enum Step {
    Continue(Pdu),
    Done(Pdu, Box<LoggedIn>),
}

fn yes(v: &str) -> bool {
    v.eq_ignore_ascii_case("Yes")
}
fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}
fn number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

impl State<'_> {
    async fn step(&mut self, req: &Pdu) -> Result<Step, LoginFailed> {
        if req.opcode() != op::LOGIN {
            return Err(fail(
                status::INVALID_DURING_LOGIN,
                format!("opcode {:#04x} before login completed", req.opcode()),
            ));
        }
        let flags = req.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
        if transit && cont {
            return Err(fail(
                status::INITIATOR_ERROR,
                "login request with both T and C",
            ));
        }
        if req.bhs[3] > 0 {
            return Err(fail(
                status::UNSUPPORTED_VERSION,
                format!("initiator needs iSCSI version ≥ {}", req.bhs[3]),
            ));
        }
        if csg == 2 || (transit && (nsg == 2 || nsg <= csg)) {
            return Err(fail(
                status::INITIATOR_ERROR,
                format!("invalid stage transition {csg}→{nsg}"),
            ));
        }
        if self.text.len() + req.data.len() > MAX_LOGIN_TEXT {
            return Err(fail(status::INITIATOR_ERROR, "login text too long"));
        }
        self.text.extend_from_slice(&req.data);
        if cont {
            // The keys continue in the next PDU; an empty answer asks for it.
            return Ok(Step::Continue(self.response(
                req,
                csg,
                false,
                Vec::new(),
                0,
                csg,
            )));
        }
        let text = std::mem::take(&mut self.text);
        let keys = pdu::parse_text(&text).map_err(|e| fail(status::INITIATOR_ERROR, e))?;
        if self.first.is_none() {
            self.first_request(req, &keys).await?;
        }
        let mut out: Vec<(String, String)> = Vec::new();
        if csg == 0 {
            self.security(&keys, &mut out)?;
        } else {
            if self.auth == Auth::ChapMethod || self.auth == Auth::ChapChallenged {
                return Err(fail(status::AUTH_FAILED, "CHAP exchange not completed"));
            }
            if self.chap_required() && self.auth != Auth::Done {
                return Err(fail(
                    status::AUTH_FAILED,
                    "target requires CHAP; the initiator skipped security negotiation",
                ));
            }
            for (k, v) in &keys {
                self.operational(k, v, &mut out);
            }
        }
        if csg == 1 && !self.declared {
            out.push((
                "MaxRecvDataSegmentLength".into(),
                OUR_MAX_RECV_DATA_SEGMENT.to_string(),
            ));
            self.params.max_recv_data_segment = OUR_MAX_RECV_DATA_SEGMENT;
            self.declared = true;
        }
        if self.kind == SessionKind::Normal && !self.sent_tpgt {
            out.push((
                "TargetPortalGroupTag".into(),
                self.shared.cfg.portal_group_tag.to_string(),
            ));
            self.sent_tpgt = true;
        }
        // Transit only once security is settled.
        let may_transit = match self.auth {
            Auth::Done | Auth::Open => true,
            Auth::Start => csg == 1 || !self.chap_required(),
            _ => false,
        };
        let transit = transit && may_transit;
        if transit && nsg == 3 {
            let done = self.finish(req).await?;
            let mut resp = self.response(req, csg, true, pdu::build_text(&out), 0, nsg);
            resp.set_u16(14, done.session.tsih);
            return Ok(Step::Done(resp, Box::new(done)));
        }
        Ok(Step::Continue(self.response(
            req,
            csg,
            transit,
            pdu::build_text(&out),
            0,
            nsg,
        )))
    }

    fn chap_required(&self) -> bool {
        self.kind == SessionKind::Normal && self.target.as_ref().is_some_and(|t| t.chap.is_some())
    }

    async fn first_request(
        &mut self,
        req: &Pdu,
        keys: &[(String, String)],
    ) -> Result<(), LoginFailed> {
        let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        let initiator = get("InitiatorName")
            .ok_or_else(|| fail(status::MISSING_PARAMETER, "no InitiatorName"))?;
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&req.bhs[8..14]);
        self.first = Some(First {
            isid,
            tsih: req.u16_at(14),
            cid: req.u16_at(20),
            cmdsn: req.cmdsn(),
            statsn: req.exp_statsn(),
            initiator: initiator.clone(),
        });
        self.kind = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionKind::Normal,
            Some("Discovery") => SessionKind::Discovery,
            Some(other) => {
                return Err(fail(
                    status::SESSION_TYPE_UNSUPPORTED,
                    format!("session type {other:.32}"),
                ))
            }
        };
        if self.kind == SessionKind::Discovery {
            return Ok(());
        }
        let name =
            get("TargetName").ok_or_else(|| fail(status::MISSING_PARAMETER, "no TargetName"))?;
        let target = self
            .shared
            .targets
            .target(&name)
            .await
            .map_err(|e| fail(status::SERVICE_UNAVAILABLE, e.to_string()))?
            .ok_or_else(|| fail(status::NOT_FOUND, format!("no target {name:.224}")))?;
        if !target.admits(&initiator) {
            return Err(fail(
                status::FORBIDDEN,
                format!("initiator {initiator:.224} is not on {name}'s allow list"),
            ));
        }
        self.target = Some(target);
        Ok(())
    }

    fn security(
        &mut self,
        keys: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginFailed> {
        let map: HashMap<&str, &str> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if let Some(methods) = map.get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let chosen = if self.chap_required() {
                if !offered.contains(&"CHAP") {
                    return Err(fail(
                        status::AUTH_FAILED,
                        "target requires CHAP; the initiator did not offer it",
                    ));
                }
                self.auth = Auth::ChapMethod;
                "CHAP"
            } else if offered.contains(&"None") {
                self.auth = Auth::Open;
                "None"
            } else {
                return Err(fail(
                    status::AUTH_FAILED,
                    "target has no CHAP credentials and the initiator requires authentication",
                ));
            };
            out.push(("AuthMethod".into(), chosen.into()));
        }
        if let Some(algs) = map.get("CHAP_A") {
            if self.auth != Auth::ChapMethod {
                return Err(fail(
                    status::INITIATOR_ERROR,
                    "CHAP_A before AuthMethod=CHAP",
                ));
            }
            if !algs.split(',').any(|a| a == chap::ALGORITHM_MD5) {
                return Err(fail(
                    status::AUTH_FAILED,
                    "initiator does not offer CHAP with MD5",
                ));
            }
            let c = Challenge::new();
            out.push(("CHAP_A".into(), chap::ALGORITHM_MD5.into()));
            out.push(("CHAP_I".into(), c.id.to_string()));
            out.push(("CHAP_C".into(), c.challenge_hex()));
            self.challenge = Some(c);
            self.auth = Auth::ChapChallenged;
        }
        if map.contains_key("CHAP_R") || map.contains_key("CHAP_N") {
            self.verify_chap(&map, out)?;
        }
        for (k, v) in keys {
            if !k.starts_with("CHAP_")
                && !matches!(
                    k.as_str(),
                    "AuthMethod"
                        | "InitiatorName"
                        | "TargetName"
                        | "SessionType"
                        | "InitiatorAlias"
                )
            {
                self.operational(k, v, out);
            }
        }
        Ok(())
    }

    fn verify_chap(
        &mut self,
        map: &HashMap<&str, &str>,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), LoginFailed> {
        let (Some(challenge), Some(target)) = (self.challenge.clone(), self.target.clone()) else {
            return Err(fail(
                status::INITIATOR_ERROR,
                "CHAP response without a challenge",
            ));
        };
        if self.auth != Auth::ChapChallenged {
            return Err(fail(status::INITIATOR_ERROR, "CHAP response out of order"));
        }
        let creds = target
            .chap
            .as_ref()
            .ok_or_else(|| fail(status::AUTH_FAILED, "no CHAP credentials"))?;
        let user = map.get("CHAP_N").copied().unwrap_or_default();
        let resp = map
            .get("CHAP_R")
            .ok_or_else(|| fail(status::AUTH_FAILED, "CHAP_N without CHAP_R"))
            .and_then(|r| chap::decode_binary(r).map_err(|e| fail(status::AUTH_FAILED, e)))?;
        let want = chap::response(challenge.id, creds.secret.as_bytes(), &challenge.challenge);
        // One message for a wrong user and a wrong secret: which one it was
        // is for the log, not the initiator.
        if user != creds.user || !chap::constant_time_eq(&resp, &want) {
            return Err(fail(
                status::AUTH_FAILED,
                format!("CHAP authentication failed for user {user:.64}"),
            ));
        }
        if let Some(ci) = map.get("CHAP_I") {
            let cc = map
                .get("CHAP_C")
                .ok_or_else(|| fail(status::AUTH_FAILED, "CHAP_I without CHAP_C"))?;
            let mutual = target.mutual_chap.as_ref().ok_or_else(|| {
                fail(
                    status::AUTH_FAILED,
                    "initiator asks for mutual CHAP; the target has no mutual credentials",
                )
            })?;
            let id = number(ci)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| fail(status::AUTH_FAILED, "invalid CHAP_I"))?;
            let c = chap::decode_binary(cc).map_err(|e| fail(status::AUTH_FAILED, e))?;
            // A reflected challenge would let an attacker use us as an oracle.
            if c == challenge.challenge || c.is_empty() {
                return Err(fail(status::AUTH_FAILED, "mutual CHAP challenge refused"));
            }
            let r = chap::response(id, mutual.secret.as_bytes(), &c);
            out.push(("CHAP_N".into(), mutual.user.clone()));
            out.push(("CHAP_R".into(), format!("0x{}", hex::encode(r))));
        } else if target.mutual_chap.is_some() {
            return Err(fail(
                status::AUTH_FAILED,
                "target requires mutual CHAP; the initiator sent no challenge",
            ));
        }
        self.auth = Auth::Done;
        tracing::info!(user = %user, target = %target.iqn, "CHAP authentication succeeded");
        Ok(())
    }

    fn operational(&mut self, k: &str, v: &str, out: &mut Vec<(String, String)>) {
        let discovery = self.kind == SessionKind::Discovery;
        let p = &mut self.params;
        let reply = match k {
            "HeaderDigest" | "DataDigest" => {
                let pick = v
                    .split(',')
                    .find(|c| *c == "CRC32C" || *c == "None")
                    .unwrap_or("Reject");
                if k == "HeaderDigest" {
                    p.header_digest = pick == "CRC32C";
                } else {
                    p.data_digest = pick == "CRC32C";
                }
                pick.to_string()
            }
            "MaxRecvDataSegmentLength" => {
                if let Some(n) = number(v) {
                    p.max_xmit_data_segment = n.clamp(512, (1 << 24) - 1) as u32;
                }
                return;
            }
            "InitialR2T" if !discovery => {
                p.initial_r2t = yes(v);
                yn(p.initial_r2t)
            }
            "ImmediateData" if !discovery => {
                p.immediate_data = yes(v);
                yn(p.immediate_data)
            }
            "MaxBurstLength" if !discovery => {
                let n = number(v)
                    .unwrap_or(262144)
                    .clamp(512, u64::from(OUR_MAX_BURST));
                p.max_burst = n as u32;
                p.first_burst = p.first_burst.min(p.max_burst);
                n.to_string()
            }
            "FirstBurstLength" if !discovery => {
                let n = number(v)
                    .unwrap_or(65536)
                    .clamp(512, u64::from(OUR_FIRST_BURST))
                    .min(u64::from(p.max_burst));
                p.first_burst = n as u32;
                n.to_string()
            }
            "MaxOutstandingR2T" if !discovery => {
                let n = number(v)
                    .unwrap_or(1)
                    .clamp(1, u64::from(OUR_MAX_OUTSTANDING_R2T));
                p.max_outstanding_r2t = n as u32;
                n.to_string()
            }
            "MaxConnections" => {
                let n = number(v)
                    .unwrap_or(1)
                    .clamp(1, u64::from(OUR_MAX_CONNECTIONS));
                p.max_connections = n as u16;
                n.to_string()
            }
            "DataPDUInOrder" | "DataSequenceInOrder" if !discovery => "Yes".into(),
            "ErrorRecoveryLevel" => "0".into(),
            "DefaultTime2Wait" => number(v).unwrap_or(2).clamp(2, 3600).to_string(),
            "DefaultTime2Retain" => "0".into(),
            "IFMarker" | "OFMarker" => "No".into(),
            "OFMarkInt" | "IFMarkInt" => "Irrelevant".into(),
            "TaskReporting" => "RFC3720".into(),
            "iSCSIProtocolLevel" => number(v).unwrap_or(0).min(1).to_string(),
            // Declaratives of the initiator: nothing to answer.
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => return,
            "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder" => "Irrelevant".into(),
            _ => "NotUnderstood".into(),
        };
        out.push((k.to_string(), reply));
    }

    /// Creates, reinstates or joins the session.
    async fn finish(&mut self, req: &Pdu) -> Result<LoggedIn, LoginFailed> {
        let first = self
            .first
            .clone()
            .ok_or_else(|| fail(status::INITIATOR_ERROR, "no first login request"))?;
        if req.u16_at(20) != first.cid || req.bhs[8..14] != first.isid {
            return Err(fail(
                status::INITIATOR_ERROR,
                "login requests disagree on CID or ISID",
            ));
        }
        let reg = &self.shared.registry;
        let statsn = first.statsn.wrapping_add(1);
        if first.tsih != 0 {
            // Another connection of an existing session.
            let s = reg
                .get(first.tsih)
                .filter(|s| s.isid == first.isid && s.initiator_name == first.initiator)
                .ok_or_else(|| {
                    fail(
                        status::NO_SESSION,
                        format!("no session with TSIH {}", first.tsih),
                    )
                })?;
            if s.connection_count() >= usize::from(s.params.max_connections) {
                return Err(fail(
                    status::TOO_MANY_CONNECTIONS,
                    "session has its connections",
                ));
            }
            let mut params = s.params;
            params.header_digest = self.params.header_digest;
            params.data_digest = self.params.data_digest;
            params.max_xmit_data_segment = self.params.max_xmit_data_segment;
            params.max_recv_data_segment = self.params.max_recv_data_segment;
            reg.attach(&s);
            return Ok(LoggedIn {
                session: s,
                params,
                cid: first.cid,
                statsn,
            });
        }
        let mut luns = HashMap::new();
        let target_name = match &self.target {
            Some(t) => {
                for m in &t.luns {
                    match self.shared.blocks.open(&m.vdisk_id).await {
                        Ok(dev) => {
                            let ident = crate::scsi::LunIdentity {
                                vdisk_id: m.vdisk_id.clone(),
                                vdisk_name: m.vdisk_name.clone(),
                            };
                            let unit =
                                reg.unit(&m.vdisk_id, || crate::remote::new_unit(dev, ident));
                            luns.insert(m.lun, unit);
                        }
                        Err(e) => {
                            tracing::warn!(target = %t.iqn, lun = m.lun, vdisk = %m.vdisk_id,
                                error = %e, "LUN not offered at login: its vdisk cannot be opened");
                        }
                    }
                }
                if luns.is_empty() && !t.luns.is_empty() {
                    return Err(fail(
                        status::SERVICE_UNAVAILABLE,
                        "none of the target's vdisks can be opened now",
                    ));
                }
                t.iqn.clone()
            }
            None => String::new(),
        };
        let s = Arc::new(Session::new(
            reg.allocate_tsih(),
            first.isid,
            self.kind,
            first.initiator.clone(),
            target_name,
            self.shared.cfg.portal_group_tag,
            self.params,
            first.cmdsn,
            luns,
        ));
        for old in reg.insert(s.clone()) {
            tracing::info!(initiator = %old.initiator_name, tsih = old.tsih,
                "session reinstated: closing the old one");
            let _ = old.closing.send(true);
        }
        reg.attach(&s);
        Ok(LoggedIn {
            session: s,
            params: self.params,
            cid: first.cid,
            statsn,
        })
    }

    fn response(
        &self,
        req: &Pdu,
        csg: u8,
        transit: bool,
        data: Vec<u8>,
        code: u16,
        nsg: u8,
    ) -> Pdu {
        let mut flags = (csg & 3) << 2;
        if transit {
            flags |= 0x80 | (nsg & 3);
        }
        let mut p = Pdu::new(op::LOGIN_RESP, flags);
        p.bhs[2] = 0;
        p.bhs[3] = 0;
        p.bhs[8..16].copy_from_slice(&req.bhs[8..16]);
        p.set_itt(req.itt());
        let (statsn, cmdsn) = self
            .first
            .as_ref()
            .map(|f| (f.statsn, f.cmdsn))
            .unwrap_or((req.exp_statsn(), req.cmdsn()));
        p.set_u32(24, statsn);
        let w = crate::session::Window::new(cmdsn);
        p.set_u32(28, w.exp_cmdsn);
        p.set_u32(32, w.max_cmdsn);
        p.set_u16(36, code);
        p.data = data;
        p
    }
}
