//! A minimal iSCSI initiator for commands no packaged tool sends (persistent
//! reservations): login without CHAP straight to the full feature phase,
//! SCSI commands on LUN 0 with immediate data, Data-In collected.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_iscsi::pdu::{self, op, Pdu, ReadLimits, RESERVED_TAG};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LIMITS: ReadLimits = ReadLimits {
    max_data: 1 << 24,
    header_digest: false,
    data_digest: false,
};

/// What a command produced.
#[derive(Debug)]
pub struct Answer {
    pub status: u8,
    pub data_in: Vec<u8>,
    pub sense: Vec<u8>,
}

/// One session with one connection.
pub struct Client {
    rt: tokio::runtime::Runtime,
    s: TcpStream,
    itt: u32,
    cmdsn: u32,
}

impl Client {
    /// Logs in to `target` at `portal` as `initiator` with ISID tail
    /// `isid` (same name and ISID: the same SCSI initiator port).
    pub fn login(portal: &str, initiator: &str, isid: u8, target: &str) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let s = rt.block_on(TcpStream::connect(portal))?;
        let mut c = Client {
            rt,
            s,
            itt: 1,
            cmdsn: 1,
        };
        let mut p = Pdu::new(op::LOGIN, 0x80 | 3);
        p.bhs[0] |= 0x40;
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, isid]);
        p.set_u32(24, 1);
        p.data = pdu::build_text(&[
            ("InitiatorName".into(), initiator.into()),
            ("TargetName".into(), target.into()),
            ("SessionType".into(), "Normal".into()),
            ("AuthMethod".into(), "None".into()),
        ]);
        let r = c.exchange(&p)?;
        if r.opcode() != op::LOGIN_RESP || r.u16_at(36) != 0 || r.flags() & 0x83 != 0x83 {
            bail!("login to {portal} refused (status {:#06x})", r.u16_at(36));
        }
        Ok(c)
    }

    fn exchange(&mut self, p: &Pdu) -> Result<Pdu> {
        let bytes = p.encode(false, false);
        self.rt.block_on(async {
            self.s.write_all(&bytes).await?;
            Self::recv(&mut self.s).await
        })
    }

    /// The answer to what was just sent: a close counts as an error here.
    async fn recv(s: &mut TcpStream) -> Result<Pdu> {
        Self::read_within(s, Duration::from_secs(30))
            .await?
            .context("the target closed the connection")
    }

    /// The next PDU the target sends unasked (a ping); `None` once it has
    /// closed the connection between PDUs; an error when nothing comes
    /// within `within`, or when what comes is not a whole, valid PDU.
    pub fn next_pdu(&mut self, within: Duration) -> Result<Option<Pdu>> {
        self.rt.block_on(Self::read_within(&mut self.s, within))
    }

    async fn read_within(s: &mut TcpStream, within: Duration) -> Result<Option<Pdu>> {
        match tokio::time::timeout(within, pdu::read_pdu(s, LIMITS)).await {
            Err(_) => bail!("nothing from the target in {within:?}"),
            Ok(Ok(p)) => Ok(Some(p)),
            Ok(Err(pdu::PduError::Closed)) => Ok(None),
            Ok(Err(pdu::PduError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Ok(None)
            }
            Ok(Err(e)) => bail!("bad PDU from the target: {e}"),
        }
    }

    /// Runs `cdb` on LUN 0, sending `data_out` as immediate data and
    /// accepting up to `read_len` bytes of Data-In.
    pub fn command(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> Result<Answer> {
        let mut flags = 0x80;
        if read_len > 0 {
            flags |= 0x40;
        }
        if !data_out.is_empty() {
            flags |= 0x20;
        }
        let mut p = Pdu::new(op::SCSI_CMD, flags);
        p.set_itt(self.itt);
        let edtl = if data_out.is_empty() {
            read_len
        } else {
            data_out.len() as u32
        };
        p.set_u32(20, edtl);
        p.set_u32(24, self.cmdsn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        p.data = data_out.to_vec();
        self.itt += 1;
        self.cmdsn += 1;
        let mut r = self.exchange(&p)?;
        let mut data_in = Vec::new();
        loop {
            match r.opcode() {
                op::DATA_IN => {
                    data_in.extend_from_slice(&r.data);
                    if r.flags() & 0x01 != 0 {
                        return Ok(Answer {
                            status: r.bhs[3],
                            data_in,
                            sense: Vec::new(),
                        });
                    }
                }
                op::SCSI_RESP => {
                    let sense = r.data.get(2..).unwrap_or_default().to_vec();
                    return Ok(Answer {
                        status: r.bhs[3],
                        data_in,
                        sense,
                    });
                }
                // A ping from a target that found the session idle (a
                // test may leave it so for longer than the node's interval).
                op::NOP_IN if r.itt() == RESERVED_TAG && r.u32_at(20) != RESERVED_TAG => {
                    let mut a = Pdu::new(op::NOP_OUT, 0x80);
                    a.bhs[0] |= 0x40;
                    a.set_itt(RESERVED_TAG);
                    a.set_u32(20, r.u32_at(20));
                    a.set_u32(24, self.cmdsn);
                    let bytes = a.encode(false, false);
                    self.rt.block_on(self.s.write_all(&bytes))?;
                }
                o => bail!("unexpected PDU opcode {o:#04x}"),
            }
            r = self.rt.block_on(Self::recv(&mut self.s))?;
        }
    }

    /// PERSISTENT RESERVE OUT with the basic 24-byte parameter list.
    pub fn pr_out(&mut self, action: u8, ty: u8, key: u64, sa_key: u64) -> Result<u8> {
        let cdb = [0x5F, action, ty, 0, 0, 0, 0, 0, 24, 0];
        let mut p = key.to_be_bytes().to_vec();
        p.extend_from_slice(&sa_key.to_be_bytes());
        p.extend_from_slice(&[0u8; 8]);
        Ok(self.command(&cdb, &p, 0)?.status)
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION: (key, type) if reserved.
    pub fn reservation(&mut self) -> Result<Option<(u64, u8)>> {
        let a = self.command(&[0x5E, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[], 255)?;
        if a.status != 0 {
            bail!("READ RESERVATION: status {:#04x}", a.status);
        }
        let d = &a.data_in;
        if d.len() < 8 || u32::from_be_bytes([d[4], d[5], d[6], d[7]]) == 0 {
            return Ok(None);
        }
        if d.len() < 22 {
            bail!("READ RESERVATION: short answer {d:?}");
        }
        let key = u64::from_be_bytes(d[8..16].try_into()?);
        Ok(Some((key, d[21] & 0x0f)))
    }

    /// WRITE(10) of one 512-byte block at `lba`: the SCSI status.
    pub fn write_block(&mut self, lba: u32, fill: u8) -> Result<u8> {
        let mut cdb = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        Ok(self.command(&cdb, &[fill; 512], 0)?.status)
    }
}
