//! nf_tables over netlink, by hand: netlink attributes, nf_tables messages, batches (one
//! batch = one atomic transaction) and the socket that sends them.
//!
//! Why not the `nft` program: it reads the whole ruleset into its cache before applying
//! anything (~0.5 s with 10,000 Services), so a one-endpoint change cannot be fast. No
//! permissively licensed crate encodes nf_tables batches, so this module does, and only the
//! wire format: what the messages mean is [`crate::nft`]'s business. Constants are the
//! kernel's ABI (`linux/netfilter/nf_tables.h`, `linux/netfilter/nfnetlink.h`).

use std::io;

/// nfnetlink subsystem of nf_tables.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;

pub const NFPROTO_IPV4: u8 = 2;

/// nf_tables message types.
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const GETTABLE: u16 = 1;
    pub const DELTABLE: u16 = 2;
    pub const NEWCHAIN: u16 = 3;
    pub const DELCHAIN: u16 = 5;
    pub const NEWRULE: u16 = 6;
    pub const DELRULE: u16 = 8;
    pub const NEWSET: u16 = 9;
    pub const DELSET: u16 = 11;
    pub const NEWSETELEM: u16 = 12;
    pub const DELSETELEM: u16 = 14;
}

/// Attribute numbers, per object.
pub mod attr {
    pub const TABLE_NAME: u16 = 1;

    pub const CHAIN_TABLE: u16 = 1;
    pub const CHAIN_NAME: u16 = 3;
    pub const CHAIN_HOOK: u16 = 4;
    pub const CHAIN_POLICY: u16 = 5;
    pub const CHAIN_TYPE: u16 = 7;
    pub const HOOK_HOOKNUM: u16 = 1;
    pub const HOOK_PRIORITY: u16 = 2;

    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_EXPRESSIONS: u16 = 4;

    pub const SET_TABLE: u16 = 1;
    pub const SET_NAME: u16 = 2;
    pub const SET_FLAGS: u16 = 3;
    pub const SET_KEY_TYPE: u16 = 4;
    pub const SET_KEY_LEN: u16 = 5;
    pub const SET_DATA_TYPE: u16 = 6;
    pub const SET_DATA_LEN: u16 = 7;
    pub const SET_ID: u16 = 10;
    pub const SET_TIMEOUT: u16 = 11;

    pub const SET_ELEM_LIST_TABLE: u16 = 1;
    pub const SET_ELEM_LIST_SET: u16 = 2;
    pub const SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const SET_ELEM_KEY: u16 = 1;
    pub const SET_ELEM_DATA: u16 = 2;

    pub const LIST_ELEM: u16 = 1;
    pub const DATA_VALUE: u16 = 1;
    pub const DATA_VERDICT: u16 = 2;
    pub const VERDICT_CODE: u16 = 1;
    pub const VERDICT_CHAIN: u16 = 2;

    pub const EXPR_NAME: u16 = 1;
    pub const EXPR_DATA: u16 = 2;
}

/// Set flags.
pub const NFT_SET_MAP: u32 = 0x8;
pub const NFT_SET_TIMEOUT: u32 = 0x10;
pub const NFT_SET_EVAL: u32 = 0x20;

/// Verdict codes (netfilter's and nf_tables' own).
pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;
pub const NFT_RETURN: i32 = -5;
pub const NFT_GOTO: i32 = -4;
pub const NFT_JUMP: i32 = -3;

/// Registers: the verdict register and the 4-byte data registers from the first one on.
pub const REG_VERDICT: u32 = 0;
pub const REG32_00: u32 = 8;

/// Writes netlink attributes (type-length-value, each padded to 4 bytes) into a buffer.
pub struct Attrs<'a> {
    buf: &'a mut Vec<u8>,
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

impl<'a> Attrs<'a> {
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        Attrs { buf }
    }

    pub fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        pad(self.buf);
        self
    }

    /// Attributes already encoded.
    pub fn raw(&mut self, encoded: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(encoded);
        pad(self.buf);
        self
    }

    /// A NUL-terminated string.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.bytes(ty, &v)
    }

    /// nf_tables integers are big-endian.
    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    pub fn be64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    pub fn u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.bytes(ty, &[v])
    }

    /// A nested attribute holding what `f` writes.
    pub fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(&mut Attrs { buf: self.buf });
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// `NFTA_DATA_VALUE` inside `ty`.
    pub fn value(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        self.nest(ty, |a| {
            a.bytes(attr::DATA_VALUE, data);
        })
    }

    /// `NFTA_DATA_VERDICT` inside `ty`.
    pub fn verdict(&mut self, ty: u16, code: i32, chain: Option<&str>) -> &mut Self {
        self.nest(ty, |a| {
            a.nest(attr::DATA_VERDICT, |v| {
                v.be32(attr::VERDICT_CODE, code as u32);
                if let Some(c) = chain {
                    v.str(attr::VERDICT_CHAIN, c);
                }
            });
        })
    }

    /// One expression of a rule: its name and its attributes.
    pub fn expr(&mut self, name: &str, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        self.nest(attr::LIST_ELEM, |e| {
            e.str(attr::EXPR_NAME, name);
            e.nest(attr::EXPR_DATA, f);
        })
    }
}

fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

fn seal(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// One transaction: messages between a batch begin and a batch end. The kernel applies all
/// of them or none.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Where the last message starts (it asks for the acknowledgement).
    last: Option<usize>,
    messages: usize,
    ids: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(4096);
        let start = header(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        seal(&mut buf, start);
        Batch {
            buf,
            seq: 0,
            last: None,
            messages: 0,
            ids: 0,
        }
    }

    /// Add an nf_tables message of type `ty` (see [`msg`]).
    pub fn push(&mut self, ty: u16, flags: u16, f: impl FnOnce(&mut Attrs)) {
        self.seq += 1;
        let start = header(
            &mut self.buf,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            self.seq,
            NFPROTO_IPV4,
            0,
        );
        f(&mut Attrs::new(&mut self.buf));
        seal(&mut self.buf, start);
        self.last = Some(start);
        self.messages += 1;
    }

    /// A number unique in this batch (sets need one).
    pub fn next_id(&mut self) -> u32 {
        self.ids += 1;
        self.ids
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    pub fn len(&self) -> usize {
        self.messages
    }

    /// The bytes to send, and the sequence number whose acknowledgement ends the reply.
    pub fn finish(mut self) -> (Vec<u8>, u32) {
        if let Some(last) = self.last {
            let flags_at = last + 6;
            let flags =
                u16::from_ne_bytes([self.buf[flags_at], self.buf[flags_at + 1]]) | NLM_F_ACK;
            self.buf[flags_at..flags_at + 2].copy_from_slice(&flags.to_ne_bytes());
        }
        let seq = self.seq;
        let start = header(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq + 1,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        seal(&mut self.buf, start);
        (self.buf, seq)
    }
}

/// What the kernel said about a batch it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The message it refused (1 = the batch's first).
    pub seq: u32,
    pub errno: i32,
}

/// One message of a reply.
struct Reply<'a> {
    ty: u16,
    seq: u32,
    /// For `NLMSG_ERROR`: the error (0: an acknowledgement).
    errno: i32,
    /// After the netlink header.
    body: &'a [u8],
}

/// The messages in `buf`.
fn replies(buf: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
        let errno = if ty == NLMSG_ERROR && len >= 20 {
            -i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap())
        } else {
            0
        };
        out.push(Reply {
            ty,
            seq,
            errno,
            body: &buf[at + 16..at + len],
        });
        at += (len + 3) & !3;
    }
    out
}

/// The attributes in `buf`: (type without its flag bits, payload).
pub fn parse_attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            break;
        }
        out.push((ty, &buf[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// nfnetlink subsystem of conntrack, and its message types.
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub const IPCTNL_MSG_CT_GET: u16 = 1;
pub const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;

/// A netlink socket to netfilter (nf_tables, conntrack).
pub struct Socket {
    sock: netlink_sys::Socket,
    buf: Vec<u8>,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        // Error replies carry only the header of the refused message, not all of it.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(false);
        // The kernel always answers; should it not, fail (the caller drops this socket, and
        // with it any late reply) rather than hang the sync loop.
        rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_secs(30)),
        )?;
        Ok(Socket {
            sock,
            buf: vec![0; 1 << 16],
        })
    }

    fn grow_sndbuf(&self, len: usize) {
        // Needs CAP_NET_ADMIN (which nf_tables needs anyway); else the default stays.
        let _ =
            rustix::net::sockopt::set_socket_send_buffer_size_force(&self.sock, len + (1 << 16));
    }

    /// Send one transaction and wait for the kernel's verdict on it.
    pub fn send(&mut self, batch: Batch) -> io::Result<Result<(), Refusal>> {
        if batch.is_empty() {
            return Ok(Ok(()));
        }
        let (bytes, last) = batch.finish();
        if bytes.len() > 200_000 {
            self.grow_sndbuf(bytes.len());
        }
        let sent = self.sock.send(&bytes, 0)?;
        if sent != bytes.len() {
            return Err(io::Error::other("netlink: short send"));
        }
        let mut refusal = None;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for Reply { seq, errno, ty, .. } in replies(&self.buf[..n]) {
                if ty == NLMSG_ERROR && errno != 0 && refusal.is_none() {
                    refusal = Some(Refusal { seq, errno });
                }
                // The batch begin itself refused: nothing else comes.
                if seq == last || (seq == 0 && errno != 0) {
                    return Ok(refusal.map_or(Ok(()), Err));
                }
            }
        }
    }

    /// Dump every object of an nfnetlink subsystem's `GET` (`subsys`, `msg`) for `family`:
    /// each reply message's attributes (after its nfgenmsg header).
    pub fn dump(&mut self, subsys: u16, msg: u16, family: u8) -> io::Result<Vec<Vec<u8>>> {
        let mut buf = Vec::new();
        let start = header(
            &mut buf,
            (subsys << 8) | msg,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            family,
            0,
        );
        seal(&mut buf, start);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for r in replies(&self.buf[..n]) {
                match r.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if r.errno != 0 => {
                        return Err(io::Error::from_raw_os_error(r.errno));
                    }
                    NLMSG_ERROR => return Ok(out),
                    // After the nfgenmsg header.
                    _ if r.body.len() >= 4 => out.push(r.body[4..].to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// Send one request per body (attributes), acknowledged one by one; a body the kernel
    /// answers ENOENT for (already gone) counts as done. How many the kernel carried out.
    pub fn requests(
        &mut self,
        subsys: u16,
        msg: u16,
        family: u8,
        bodies: &[Vec<u8>],
    ) -> io::Result<usize> {
        let mut done = 0;
        for chunk in bodies.chunks(256) {
            let mut buf = Vec::new();
            for (i, body) in chunk.iter().enumerate() {
                let start = header(
                    &mut buf,
                    (subsys << 8) | msg,
                    NLM_F_REQUEST | NLM_F_ACK,
                    i as u32 + 1,
                    family,
                    0,
                );
                buf.extend_from_slice(body);
                seal(&mut buf, start);
            }
            self.sock.send(&buf, 0)?;
            let mut acked = 0;
            while acked < chunk.len() {
                let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
                for Reply { errno, ty, .. } in replies(&self.buf[..n]) {
                    if ty != NLMSG_ERROR {
                        continue;
                    }
                    acked += 1;
                    match errno {
                        0 => done += 1,
                        libc::ENOENT => {}
                        e => return Err(io::Error::from_raw_os_error(e)),
                    }
                }
            }
        }
        Ok(done)
    }

    /// Whether table `name` (family ip) exists.
    pub fn has_table(&mut self, name: &str) -> io::Result<bool> {
        let mut buf = Vec::new();
        let start = header(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | msg::GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            1,
            NFPROTO_IPV4,
            0,
        );
        Attrs::new(&mut buf).str(attr::TABLE_NAME, name);
        seal(&mut buf, start);
        self.sock.send(&buf, 0)?;
        let mut found = false;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            for Reply { seq, errno, ty, .. } in replies(&self.buf[..n]) {
                if seq != 1 {
                    continue;
                }
                match ty {
                    NLMSG_ERROR if errno == libc::ENOENT => return Ok(false),
                    NLMSG_ERROR if errno != 0 => {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    NLMSG_ERROR | NLMSG_DONE => return Ok(found),
                    _ => found = true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested() {
        let mut buf = Vec::new();
        Attrs::new(&mut buf).str(1, "dbg").nest(2, |a| {
            a.be32(3, 0x0a0b0c0d);
            a.u8(4, 7);
        });
        let mut want = vec![8, 0, 1, 0, b'd', b'b', b'g', 0];
        want.extend_from_slice(&[20, 0, 2, 0x80]);
        want.extend_from_slice(&[8, 0, 3, 0, 0x0a, 0x0b, 0x0c, 0x0d]);
        want.extend_from_slice(&[5, 0, 4, 0, 7, 0, 0, 0]);
        if cfg!(target_endian = "little") {
            assert_eq!(buf, want);
        }
    }

    #[test]
    fn a_batch_is_framed_and_its_last_message_asks_for_an_ack() {
        let mut b = Batch::new();
        assert!(b.is_empty());
        b.push(msg::NEWTABLE, NLM_F_CREATE, |a| {
            a.str(attr::TABLE_NAME, "t");
        });
        b.push(msg::DELTABLE, 0, |a| {
            a.str(attr::TABLE_NAME, "t");
        });
        let (bytes, last) = b.finish();
        assert_eq!(last, 2);
        let got = replies(&bytes);
        let types: Vec<u16> = got.iter().map(|g| g.ty).collect();
        let tables = NFNL_SUBSYS_NFTABLES << 8;
        assert_eq!(types, [16, tables, tables | msg::DELTABLE, 17]);
        let seqs: Vec<u32> = got.iter().map(|g| g.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
        // Flags of message 2 (at 20 + 28 bytes): request + ack.
        let at = 20 + 28 + 6;
        let flags = u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK);
    }
}
