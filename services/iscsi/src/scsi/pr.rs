//! Reservations: SPC-4 persistent reservations (PERSISTENT RESERVE IN/OUT,
//! 5.13 and 6.15-6.16) and SPC-2 RESERVE/RELEASE, as a pure state machine
//! over I_T nexuses. The logical unit owns one [`Reservations`] behind a
//! mutex and asks it, for every command, whether the command conflicts.
//!
//! One logical unit per vdisk holds them, on the node that owns the vdisk
//! (other nodes' portals relay their commands there, `crate::remote`); the
//! persistent part is saved with the vdisk ([`Reservations::saved`]) so that
//! it survives an owner failover.

use cairn_api::iscsi::v1 as pb;

use super::cdb::Cdb;
use super::opcodes::PrClass;
use super::sense::Sense;
use super::Nexus;

/// Reservation types (SPC-4 table 186).
pub mod ty {
    pub const WRITE_EXCLUSIVE: u8 = 0x1;
    pub const EXCLUSIVE_ACCESS: u8 = 0x3;
    pub const WE_REGISTRANTS_ONLY: u8 = 0x5;
    pub const EA_REGISTRANTS_ONLY: u8 = 0x6;
    pub const WE_ALL_REGISTRANTS: u8 = 0x7;
    pub const EA_ALL_REGISTRANTS: u8 = 0x8;
}

/// PERSISTENT RESERVE OUT service actions.
mod out_sa {
    pub const REGISTER: u16 = 0;
    pub const RESERVE: u16 = 1;
    pub const RELEASE: u16 = 2;
    pub const CLEAR: u16 = 3;
    pub const PREEMPT: u16 = 4;
    pub const PREEMPT_AND_ABORT: u16 = 5;
    pub const REGISTER_AND_IGNORE: u16 = 6;
}

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, ty::WE_ALL_REGISTRANTS | ty::EA_ALL_REGISTRANTS)
}

/// Registrants-only and all-registrants types: every registrant may
/// access the medium.
fn registrants_access(t: u8) -> bool {
    matches!(
        t,
        ty::WE_REGISTRANTS_ONLY
            | ty::EA_REGISTRANTS_ONLY
            | ty::WE_ALL_REGISTRANTS
            | ty::EA_ALL_REGISTRANTS
    )
}

fn exclusive_access(t: u8) -> bool {
    matches!(
        t,
        ty::EXCLUSIVE_ACCESS | ty::EA_REGISTRANTS_ONLY | ty::EA_ALL_REGISTRANTS
    )
}

/// Why a command cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Check(Sense),
}

impl From<Sense> for PrError {
    fn from(s: Sense) -> Self {
        PrError::Check(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Registration {
    nexus: Nexus,
    key: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reservation {
    /// The holder; for the all-registrants types every registrant holds
    /// it and this is the nexus that reserved.
    holder: Nexus,
    ty: u8,
}

/// A unit attention the caller must queue for a nexus.
pub type Notice = (Nexus, Sense);

/// Persistent and SPC-2 reservations of one logical unit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reservations {
    generation: u32,
    regs: Vec<Registration>,
    res: Option<Reservation>,
    /// Holder of an SPC-2 RESERVE.
    spc2: Option<Nexus>,
    /// Activate Persist Through Power Loss, as the last REGISTER set it.
    aptpl: bool,
}

impl Reservations {
    /// The persistent part (registrations, the reservation, the
    /// generation), as kept with the vdisk; SPC-2 reservations are not
    /// kept (a reset or power loss releases them).
    pub fn saved(&self) -> pb::PersistentReservations {
        pb::PersistentReservations {
            format_version: cairn_api::FORMAT_VERSION,
            generation: self.generation,
            registrations: self
                .regs
                .iter()
                .map(|r| pb::persistent_reservations::Registration {
                    nexus: Some((&r.nexus).into()),
                    key: r.key,
                })
                .collect(),
            holder: self.res.as_ref().map(|r| (&r.holder).into()),
            r#type: self.res.as_ref().map_or(0, |r| u32::from(r.ty)),
            aptpl: self.aptpl,
        }
    }

    /// The reservations a logical unit starts with from what was saved.
    pub fn from_saved(s: pb::PersistentReservations) -> Result<Reservations, String> {
        let regs = s
            .registrations
            .into_iter()
            .map(|r| {
                Ok(Registration {
                    nexus: r
                        .nexus
                        .ok_or("a registration without its nexus")?
                        .try_into()?,
                    key: r.key,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let res = match s.holder {
            None => None,
            Some(h) => {
                let ty = u8::try_from(s.r#type)
                    .ok()
                    .filter(|t| valid_type(*t))
                    .ok_or_else(|| format!("reservation type {}", s.r#type))?;
                Some(Reservation {
                    holder: h.try_into()?,
                    ty,
                })
            }
        };
        Ok(Reservations {
            generation: s.generation,
            regs,
            res,
            spc2: None,
            aptpl: s.aptpl,
        })
    }

    /// Takes `other`'s SPC-2 reservation (installing a persistent change
    /// made on a copy must not undo a release that happened meanwhile).
    pub fn take_spc2_from(&mut self, other: &Reservations) {
        self.spc2 = other.spc2.clone();
    }

    /// Whether `other` differs in what [`Self::saved`] keeps.
    pub fn persistent_differs(&self, other: &Reservations) -> bool {
        self.generation != other.generation
            || self.regs != other.regs
            || self.res != other.res
            || self.aptpl != other.aptpl
    }

    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.regs.iter().find(|r| &r.nexus == n).map(|r| r.key)
    }

    fn holds(&self, n: &Nexus) -> bool {
        match &self.res {
            Some(r) if all_registrants(r.ty) => self.key_of(n).is_some(),
            Some(r) => &r.holder == n,
            None => false,
        }
    }

    /// Whether a command from `n` conflicts with a reservation held by
    /// someone else.
    pub fn conflicts(&self, n: &Nexus, class: PrClass, spc2_ok: bool) -> bool {
        if let Some(h) = &self.spc2 {
            if h != n && !spc2_ok {
                return true;
            }
        }
        let Some(r) = &self.res else {
            return false;
        };
        if self.holds(n) {
            return false;
        }
        if registrants_access(r.ty) && self.key_of(n).is_some() {
            return false;
        }
        match class {
            PrClass::Allowed | PrClass::Own => false,
            PrClass::ReadLike => exclusive_access(r.ty),
            PrClass::Conflict => true,
        }
    }

    /// SPC-2 RESERVE(6)/(10).
    pub fn reserve_spc2(&mut self, n: &Nexus) -> Result<(), PrError> {
        if self.res.is_some() {
            return Err(PrError::Conflict);
        }
        match &self.spc2 {
            Some(h) if h != n => Err(PrError::Conflict),
            _ => {
                self.spc2 = Some(n.clone());
                Ok(())
            }
        }
    }

    /// SPC-2 RELEASE(6)/(10): a no-op unless `n` holds the reservation.
    pub fn release_spc2(&mut self, n: &Nexus) {
        if self.spc2.as_ref() == Some(n) {
            self.spc2 = None;
        }
    }

    /// LUN reset: SPC-2 reservations go, persistent ones stay.
    pub fn reset(&mut self) {
        self.spc2 = None;
    }

    /// The nexus is gone (session ended): its SPC-2 reservation goes.
    pub fn nexus_gone(&mut self, n: &Nexus) {
        self.release_spc2(n);
    }

    /// PERSISTENT RESERVE IN.
    pub fn persistent_in(&self, cdb: &Cdb) -> Result<Vec<u8>, Sense> {
        let alloc = usize::from(cdb.u16(7));
        let mut out = self.generation.to_be_bytes().to_vec();
        match cdb.service_action() {
            0 => {
                let keys: Vec<u8> = self.regs.iter().flat_map(|r| r.key.to_be_bytes()).collect();
                out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                out.extend(keys);
            }
            1 => match &self.res {
                Some(r) => {
                    out.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(r.ty) {
                        0
                    } else {
                        self.key_of(&r.holder).unwrap_or(0)
                    };
                    out.extend_from_slice(&key.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, r.ty & 0x0F, 0, 0]);
                }
                None => out.extend_from_slice(&0u32.to_be_bytes()),
            },
            2 => return Ok(super::cdb::truncate(report_capabilities(self.aptpl), alloc)),
            3 => {
                let body = self.full_status();
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend(body);
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        }
        Ok(super::cdb::truncate(out, alloc))
    }

    fn full_status(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for r in &self.regs {
            let holder = self.holds(&r.nexus);
            body.extend_from_slice(&r.key.to_be_bytes());
            body.extend_from_slice(&[0, 0, 0, 0]);
            body.push(u8::from(holder));
            body.push(match (&self.res, holder) {
                (Some(res), true) => res.ty & 0x0F,
                _ => 0,
            });
            body.extend_from_slice(&[0, 0, 0, 0]);
            body.extend_from_slice(&r.nexus.target_port.to_be_bytes());
            let tid = transport_id(&r.nexus.initiator_port);
            body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
            body.extend(tid);
        }
        body
    }

    /// PERSISTENT RESERVE OUT. Returns the unit attentions to queue.
    pub fn persistent_out(
        &mut self,
        n: &Nexus,
        cdb: &Cdb,
        data: &[u8],
    ) -> Result<Vec<Notice>, PrError> {
        let action = cdb.service_action();
        let scope = cdb.u8(2) >> 4;
        let rtype = cdb.u8(2) & 0x0F;
        let list_len = cdb.u32(5) as usize;
        if action > out_sa::REGISTER_AND_IGNORE {
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        if list_len != 24 {
            return Err(Sense::param_list_length().into());
        }
        let p = data.get(..24).ok_or_else(Sense::param_list_length)?;
        let key = u64_at(p, 0);
        let sa_key = u64_at(p, 8);
        let flags = p.get(20).copied().unwrap_or(0);
        // SPEC_I_PT and ALL_TG_PT are not supported (REPORT CAPABILITIES
        // says so). APTPL is, and only a REGISTER sets it (SPC-4 6.16.3:
        // the other service actions ignore it).
        let aptpl = flags & 0x01 != 0;
        for (bit, mask) in [(3u8, 0x08u8), (2, 0x04)] {
            if flags & mask != 0 {
                return Err(Sense::invalid_param(20, Some(bit)).into());
            }
        }
        let needs_type = matches!(
            action,
            out_sa::RESERVE | out_sa::RELEASE | out_sa::PREEMPT | out_sa::PREEMPT_AND_ABORT
        );
        if needs_type {
            if scope != 0 {
                return Err(Sense::invalid_cdb(2, Some(7)).into());
            }
            if !valid_type(rtype) {
                return Err(Sense::invalid_cdb(2, Some(3)).into());
            }
        }
        match action {
            out_sa::REGISTER => self.register(n, key, sa_key, false, aptpl),
            out_sa::REGISTER_AND_IGNORE => self.register(n, key, sa_key, true, aptpl),
            _ => {
                if self.key_of(n) != Some(key) {
                    return Err(PrError::Conflict);
                }
                match action {
                    out_sa::RESERVE => self.reserve(n, rtype),
                    out_sa::RELEASE => self.release(n, rtype),
                    out_sa::CLEAR => Ok(self.clear(n)),
                    _ => self.preempt(n, sa_key, rtype),
                }
            }
        }
    }

    fn register(
        &mut self,
        n: &Nexus,
        key: u64,
        sa_key: u64,
        ignore: bool,
        aptpl: bool,
    ) -> Result<Vec<Notice>, PrError> {
        let mut notices = Vec::new();
        match self.key_of(n) {
            None => {
                if !ignore && key != 0 {
                    return Err(PrError::Conflict);
                }
                if sa_key == 0 {
                    return Ok(notices);
                }
                self.regs.push(Registration {
                    nexus: n.clone(),
                    key: sa_key,
                });
            }
            Some(have) => {
                if !ignore && have != key {
                    return Err(PrError::Conflict);
                }
                if sa_key == 0 {
                    notices = self.unregister(n);
                } else if let Some(r) = self.regs.iter_mut().find(|r| &r.nexus == n) {
                    r.key = sa_key;
                }
            }
        }
        // A key added or changed sets APTPL for everything (the last such
        // REGISTER wins); with no registration left nothing is kept.
        if sa_key != 0 {
            self.aptpl = aptpl;
        } else if self.regs.is_empty() {
            self.aptpl = false;
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(notices)
    }

    /// Removes `n`'s registration; a reservation it held goes with it
    /// (SPC-4 5.13.11.2.3) unless other registrants share it.
    fn unregister(&mut self, n: &Nexus) -> Vec<Notice> {
        self.regs.retain(|r| &r.nexus != n);
        let mut notices = Vec::new();
        if let Some(r) = self.res.clone() {
            let released = if all_registrants(r.ty) {
                self.regs.is_empty()
            } else {
                &r.holder == n
            };
            if released {
                self.res = None;
                if registrants_access(r.ty) {
                    notices = self.others(n, Sense::reservations_released());
                }
            } else if all_registrants(r.ty) && &r.holder == n {
                if let Some(next) = self.regs.first() {
                    self.res = Some(Reservation {
                        holder: next.nexus.clone(),
                        ty: r.ty,
                    });
                }
            }
        }
        notices
    }

    fn others(&self, n: &Nexus, sense: Sense) -> Vec<Notice> {
        self.regs
            .iter()
            .filter(|r| &r.nexus != n)
            .map(|r| (r.nexus.clone(), sense.clone()))
            .collect()
    }

    fn reserve(&mut self, n: &Nexus, rtype: u8) -> Result<Vec<Notice>, PrError> {
        if let Some(h) = &self.spc2 {
            if h != n {
                return Err(PrError::Conflict);
            }
        }
        match &self.res {
            Some(r) if self.holds(n) && r.ty == rtype => Ok(Vec::new()),
            Some(_) => Err(PrError::Conflict),
            None => {
                self.res = Some(Reservation {
                    holder: n.clone(),
                    ty: rtype,
                });
                Ok(Vec::new())
            }
        }
    }

    fn release(&mut self, n: &Nexus, rtype: u8) -> Result<Vec<Notice>, PrError> {
        let Some(r) = self.res.clone() else {
            return Ok(Vec::new());
        };
        if !self.holds(n) {
            return Ok(Vec::new());
        }
        if r.ty != rtype {
            return Err(Sense::invalid_release().into());
        }
        self.res = None;
        if registrants_access(r.ty) {
            return Ok(self.others(n, Sense::reservations_released()));
        }
        Ok(Vec::new())
    }

    fn clear(&mut self, n: &Nexus) -> Vec<Notice> {
        let notices = self.others(n, Sense::reservations_preempted());
        self.regs.clear();
        self.res = None;
        self.aptpl = false;
        self.generation = self.generation.wrapping_add(1);
        notices
    }

    fn preempt(&mut self, n: &Nexus, sa_key: u64, rtype: u8) -> Result<Vec<Notice>, PrError> {
        let mut notices = Vec::new();
        let res = self.res.clone();
        match res {
            Some(r) if all_registrants(r.ty) && sa_key == 0 => {
                // Everyone else loses registration; we take the reservation.
                notices = self.others(n, Sense::registrations_preempted());
                self.regs.retain(|x| &x.nexus == n);
                self.res = Some(Reservation {
                    holder: n.clone(),
                    ty: rtype,
                });
            }
            Some(r) if !all_registrants(r.ty) && self.key_of(&r.holder) == Some(sa_key) => {
                notices = self.remove_key(n, sa_key);
                self.res = Some(Reservation {
                    holder: n.clone(),
                    ty: rtype,
                });
            }
            _ => {
                if sa_key == 0 {
                    return Err(Sense::invalid_param(8, None).into());
                }
                notices.extend(self.remove_key(n, sa_key));
                if notices.is_empty() {
                    return Err(PrError::Conflict);
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(notices)
    }

    /// Removes every other registration with `key`.
    fn remove_key(&mut self, n: &Nexus, key: u64) -> Vec<Notice> {
        let gone: Vec<Notice> = self
            .regs
            .iter()
            .filter(|r| r.key == key && &r.nexus != n)
            .map(|r| (r.nexus.clone(), Sense::registrations_preempted()))
            .collect();
        self.regs.retain(|r| r.key != key || &r.nexus == n);
        gone
    }
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, dst) in b.iter_mut().enumerate() {
        *dst = p.get(at + i).copied().unwrap_or(0);
    }
    u64::from_be_bytes(b)
}

/// REPORT CAPABILITIES: CRH (SPC-2 RESERVE conflicts with persistent
/// reservations), PTPL_C (registrations are kept with the vdisk, through
/// a restart of every node), PTPL_A as the last REGISTER set it, no
/// SIP_C/ATP_C, all six types.
fn report_capabilities(aptpl: bool) -> Vec<u8> {
    vec![0x00, 0x08, 0x11, u8::from(aptpl), 0xEA, 0x01, 0x00, 0x00]
}

/// An iSCSI TransportID, initiator port format (SPC-4 7.6.4.6).
fn transport_id(initiator_port: &str) -> Vec<u8> {
    let mut name: Vec<u8> = initiator_port
        .as_bytes()
        .iter()
        .take(250)
        .copied()
        .collect();
    name.push(0);
    while !name.len().is_multiple_of(4) || name.len() < 20 {
        name.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend(name);
    t
}
