//! Sessions: what the connections of one initiator–target pair share (the
//! command window, the LUNs, the negotiated burst sizes), and the registry
//! that hands out TSIHs and reinstates a session an initiator logs in to
//! again with the same ISID.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;

use crate::scsi::{LogicalUnit, Nexus};
use cairn_util::sync::lock;

/// Commands one session may have in flight: the CmdSN window's width.
pub const QUEUE_DEPTH: u32 = 128;

/// Values negotiated at login (RFC 7143 section 13), with the RFC defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// What we declared we receive per PDU.
    pub max_recv_data_segment: u32,
    /// What the initiator declared it receives per PDU (our send limit).
    pub max_xmit_data_segment: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub max_connections: u16,
    pub error_recovery_level: u8,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 8192,
            max_xmit_data_segment: 8192,
            first_burst: 65536,
            max_burst: 262144,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            error_recovery_level: 0,
        }
    }
}

/// Discovery sessions may only ask for SendTargets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Discovery,
    Normal,
}

/// Where a command's CmdSN falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdSnCheck {
    /// Inside the window: run it.
    Accept,
    /// Outside (a duplicate or beyond MaxCmdSN): RFC 7143 4.2.2.1 says
    /// to ignore it silently.
    Ignore,
}

/// The session-wide command window (RFC 7143 4.2.2.1). MaxCmdSN grows only
/// as commands complete, so an initiator can never have more than
/// [`QUEUE_DEPTH`] commands queued here, and it never shrinks.
#[derive(Debug)]
pub struct Window {
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
    /// CmdSNs received ahead of ExpCmdSN (several connections).
    ahead: BTreeSet<u32>,
}

/// Serial number arithmetic (RFC 1982, 32 bits): a < b.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

impl Window {
    pub fn new(cmdsn: u32) -> Self {
        Window {
            exp_cmdsn: cmdsn,
            max_cmdsn: cmdsn.wrapping_add(QUEUE_DEPTH - 1),
            ahead: BTreeSet::new(),
        }
    }

    /// Whether `cmdsn` lies in [ExpCmdSN, MaxCmdSN].
    pub fn in_window(&self, cmdsn: u32) -> bool {
        !sn_lt(cmdsn, self.exp_cmdsn) && !sn_lt(self.max_cmdsn, cmdsn)
    }

    /// Accounts for a non-immediate command.
    pub fn receive(&mut self, cmdsn: u32) -> CmdSnCheck {
        if !self.in_window(cmdsn) {
            return CmdSnCheck::Ignore;
        }
        if cmdsn != self.exp_cmdsn {
            if !self.ahead.insert(cmdsn) {
                return CmdSnCheck::Ignore;
            }
            return CmdSnCheck::Accept;
        }
        self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
        while self.ahead.remove(&self.exp_cmdsn) {
            self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
        }
        CmdSnCheck::Accept
    }

    /// A command left the target: one more slot.
    pub fn complete(&mut self) {
        self.max_cmdsn = self.max_cmdsn.wrapping_add(1);
    }
}

/// One session.
pub struct Session {
    pub tsih: u16,
    pub isid: [u8; 6],
    pub kind: SessionKind,
    pub initiator_name: String,
    pub target_name: String,
    pub params: Params,
    pub window: Mutex<Window>,
    /// LUN number → logical unit.
    pub luns: HashMap<u64, Arc<LogicalUnit>>,
    pub nexus: Nexus,
    /// Set to close every connection of the session (logout, reinstatement).
    pub closing: watch::Sender<bool>,
    connections: AtomicUsize,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tsih: u16,
        isid: [u8; 6],
        kind: SessionKind,
        initiator_name: String,
        target_name: String,
        target_port: u16,
        params: Params,
        cmdsn: u32,
        luns: HashMap<u64, Arc<LogicalUnit>>,
    ) -> Self {
        let nexus = Nexus {
            initiator_port: format!("{},i,0x{}", initiator_name, hex::encode(isid)),
            initiator_name: initiator_name.clone(),
            target_name: target_name.clone(),
            target_port,
        };
        Session {
            tsih,
            isid,
            kind,
            initiator_name,
            target_name,
            params,
            window: Mutex::new(Window::new(cmdsn)),
            luns,
            nexus,
            closing: watch::channel(false).0,
            connections: AtomicUsize::new(0),
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// All sessions of this node's iSCSI server.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    next_tsih: u16,
    sessions: HashMap<u16, Arc<Session>>,
    /// Logical units by vdisk id, shared by every session that maps the
    /// vdisk so that reservations and unit attentions are seen by all.
    units: HashMap<String, Weak<LogicalUnit>>,
    /// Units this node serves for other nodes' portals: kept while the
    /// node runs, since no session here holds them and their state
    /// (reservations) must outlive each call.
    hosted: HashMap<String, Arc<LogicalUnit>>,
}

impl Registry {
    /// A free TSIH (never 0).
    pub fn allocate_tsih(&self) -> u16 {
        let mut g = lock(&self.inner);
        loop {
            g.next_tsih = g.next_tsih.wrapping_add(1);
            let t = g.next_tsih;
            if t != 0 && !g.sessions.contains_key(&t) {
                return t;
            }
        }
    }

    /// Registers a new session, returning the ones it reinstates (same
    /// initiator, ISID and target): the caller closes them.
    pub fn insert(&self, s: Arc<Session>) -> Vec<Arc<Session>> {
        let mut g = lock(&self.inner);
        let old: Vec<u16> = g
            .sessions
            .values()
            .filter(|o| {
                o.isid == s.isid
                    && o.initiator_name == s.initiator_name
                    && o.target_name == s.target_name
            })
            .map(|o| o.tsih)
            .collect();
        let removed = old.iter().filter_map(|t| g.sessions.remove(t)).collect();
        g.sessions.insert(s.tsih, s);
        removed
    }

    pub fn get(&self, tsih: u16) -> Option<Arc<Session>> {
        lock(&self.inner).sessions.get(&tsih).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        lock(&self.inner).sessions.values().cloned().collect()
    }

    /// A connection joined `s`.
    pub fn attach(&self, s: &Session) {
        s.connections.fetch_add(1, Ordering::SeqCst);
    }

    /// A connection of `s` ended; returns true when it was the last one
    /// (the session is then gone).
    pub fn detach(&self, s: &Arc<Session>) -> bool {
        let left = s
            .connections
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        if left == 0 {
            let mut g = lock(&self.inner);
            if g.sessions.get(&s.tsih).is_some_and(|o| Arc::ptr_eq(o, s)) {
                g.sessions.remove(&s.tsih);
            }
            return true;
        }
        false
    }

    /// The shared logical unit of a vdisk, made by `make` when no session
    /// holds one.
    pub fn unit(
        &self,
        vdisk_id: &str,
        make: impl FnOnce() -> Arc<LogicalUnit>,
    ) -> Arc<LogicalUnit> {
        let mut g = lock(&self.inner);
        if let Some(u) = g.units.get(vdisk_id).and_then(Weak::upgrade) {
            return u;
        }
        let u = make();
        g.units.retain(|_, w| w.strong_count() > 0);
        g.units.insert(vdisk_id.to_string(), Arc::downgrade(&u));
        u
    }

    /// The unit of a vdisk this node serves for other portals, if a
    /// session here or an earlier call made it (kept alive from now on).
    pub fn hosted(&self, vdisk_id: &str) -> Option<Arc<LogicalUnit>> {
        let mut g = lock(&self.inner);
        if let Some(u) = g.hosted.get(vdisk_id) {
            return Some(u.clone());
        }
        let u = g.units.get(vdisk_id).and_then(Weak::upgrade)?;
        g.hosted.insert(vdisk_id.to_string(), u.clone());
        Some(u)
    }

    /// [`Self::unit`], kept alive for other nodes' portals.
    pub fn host(
        &self,
        vdisk_id: &str,
        make: impl FnOnce() -> Arc<LogicalUnit>,
    ) -> Arc<LogicalUnit> {
        let u = self.unit(vdisk_id, make);
        lock(&self.inner)
            .hosted
            .insert(vdisk_id.to_string(), u.clone());
        u
    }

    /// Every live logical unit (for target-wide resets).
    pub fn units(&self) -> Vec<Arc<LogicalUnit>> {
        lock(&self.inner)
            .units
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_ignores_outside_and_grows_on_completion() {
        let mut w = Window::new(10);
        assert_eq!(w.receive(9), CmdSnCheck::Ignore);
        assert_eq!(w.receive(10), CmdSnCheck::Accept);
        assert_eq!(w.exp_cmdsn, 11);
        assert_eq!(w.receive(10), CmdSnCheck::Ignore);
        assert_eq!(w.receive(10 + QUEUE_DEPTH), CmdSnCheck::Ignore);
        // Out of order within the window (another connection).
        assert_eq!(w.receive(12), CmdSnCheck::Accept);
        assert_eq!(w.exp_cmdsn, 11);
        assert_eq!(w.receive(12), CmdSnCheck::Ignore);
        assert_eq!(w.receive(11), CmdSnCheck::Accept);
        assert_eq!(w.exp_cmdsn, 13);
        let max = w.max_cmdsn;
        w.complete();
        assert_eq!(w.max_cmdsn, max + 1);
    }

    #[test]
    fn window_wraps() {
        let mut w = Window::new(u32::MAX);
        assert_eq!(w.receive(u32::MAX), CmdSnCheck::Accept);
        assert_eq!(w.exp_cmdsn, 0);
        assert_eq!(w.receive(0), CmdSnCheck::Accept);
        assert_eq!(w.receive(u32::MAX), CmdSnCheck::Ignore);
        assert!(sn_lt(u32::MAX, 0));
    }
}
