//! Kernel struct layout from BTF (`/sys/kernel/btf/vmlinux`): the field offsets the BPF program
//! needs, since Rust BPF programs get no CO-RE field relocations.
//!
//! This is a deliberately small reader: it indexes the type section and resolves member paths
//! through anonymous structs and unions. aya-obj parses BTF too but keeps member access private,
//! and the one maintained BTF crate is LGPL, so the few lines live here.

use std::{collections::HashMap, fmt, path::Path};

use keepalive_common::KernelOffsets;

/// Where the running kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why kernel BTF could not be read or lacks what the program needs.
#[derive(Debug)]
pub enum BtfError {
    /// The BTF file could not be read.
    Read(std::io::Error),
    /// The data is not BTF this reader understands.
    Malformed(&'static str),
    /// A struct the program needs is missing.
    MissingStruct(String),
    /// A field the program needs is missing or has an unexpected size.
    Field {
        /// `struct.path.to.field`
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(err) => write!(f, "cannot read {VMLINUX_BTF}: {err}"),
            Self::Malformed(what) => write!(f, "malformed BTF: {what}"),
            Self::MissingStruct(name) => write!(f, "kernel BTF has no struct {name}"),
            Self::Field { path, reason } => write!(f, "kernel BTF field {path}: {reason}"),
        }
    }
}

impl std::error::Error for BtfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read(err) => Some(err),
            _ => None,
        }
    }
}

/// One type record: its kind, name, the size-or-type word, and where its trailing data starts.
#[derive(Clone, Copy)]
struct TypeRec {
    kind: u32,
    name_off: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    data: usize,
}

/// An indexed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    types_start: usize,
    strings_start: usize,
    strings_len: usize,
    /// Index `i` holds type id `i`; id 0 is `void`.
    types: Vec<TypeRec>,
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    /// Reads BTF from a file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        Self::parse(std::fs::read(path).map_err(BtfError::Read)?)
    }

    /// Indexes raw BTF bytes (little-endian, as on every host this agent targets).
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let u16_at = |off: usize| -> Option<u16> {
            Some(u16::from_le_bytes(data.get(off..off + 2)?.try_into().ok()?))
        };
        let u32_at = |off: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?))
        };
        if u16_at(0) != Some(BTF_MAGIC) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let header = |i| u32_at(i).ok_or(BtfError::Malformed("short header"));
        let hdr_len = header(4)? as usize;
        let type_off = header(8)? as usize;
        let type_len = header(12)? as usize;
        let str_off = header(16)? as usize;
        let str_len = header(20)? as usize;
        let types_start = hdr_len + type_off;
        let strings_start = hdr_len + str_off;
        if types_start + type_len > data.len() || strings_start + str_len > data.len() {
            return Err(BtfError::Malformed("sections past end of data"));
        }
        let mut types = vec![TypeRec {
            kind: 0,
            name_off: 0,
            vlen: 0,
            kind_flag: false,
            size_or_type: 0,
            data: 0,
        }];
        let end = types_start + type_len;
        let mut pos = types_start;
        while pos < end {
            let truncated = BtfError::Malformed("truncated type");
            let name_off = u32_at(pos).ok_or(truncated)?;
            let info = u32_at(pos + 4).ok_or(BtfError::Malformed("truncated type"))?;
            let size_or_type = u32_at(pos + 8).ok_or(BtfError::Malformed("truncated type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let data_pos = pos + 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                0..=19 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(TypeRec {
                kind,
                name_off,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type,
                data: data_pos,
            });
            pos = data_pos + extra;
        }
        Ok(Self {
            data,
            types_start,
            strings_start,
            strings_len: str_len,
            types,
        })
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.data[off..off + 4].try_into().expect("4 bytes"))
    }

    fn name(&self, name_off: u32) -> &str {
        let start = self.strings_start + name_off as usize;
        let end = self.strings_start + self.strings_len;
        let bytes = &self.data[start.min(end)..end];
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&TypeRec> {
        self.types.get(id as usize)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Size in bytes of a type, if it has one.
    fn size_of(&self, id: u32) -> Option<u32> {
        let t = self.ty(self.strip(id))?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Some(t.size_or_type),
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let elem = self.u32_at(t.data);
                let n = self.u32_at(t.data + 8);
                self.size_of(elem)?.checked_mul(n)
            }
            _ => None,
        }
    }

    /// Type ids of every struct called `name` (a kernel can have more than one, e.g. in modules;
    /// vmlinux has one).
    fn struct_ids(&self) -> HashMap<&str, u32> {
        let mut ids = HashMap::new();
        for (id, t) in self.types.iter().enumerate().skip(1) {
            if t.kind == KIND_STRUCT && t.vlen > 0 {
                ids.entry(self.name(t.name_off)).or_insert(id as u32);
            }
        }
        ids
    }

    /// Finds `name` among the members of struct/union `id`, descending into anonymous members.
    /// Returns the byte offset and the member's type id.
    fn member(&self, id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.ty(self.strip(id))?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for i in 0..t.vlen as usize {
            let at = t.data + 12 * i;
            let m_name = self.name(self.u32_at(at));
            let m_type = self.u32_at(at + 4);
            let raw = self.u32_at(at + 8);
            let bit_off = if t.kind_flag { raw & 0x00ff_ffff } else { raw };
            if m_name == name {
                return (bit_off % 8 == 0).then_some((bit_off / 8, m_type));
            }
            if m_name.is_empty()
                && let Some((off, ty)) = self.member(m_type, name, depth + 1)
            {
                return Some((bit_off / 8 + off, ty));
            }
        }
        None
    }

    /// Resolves `field.sub.field` inside a struct, checking the final field's size.
    fn offset(
        &self,
        structs: &HashMap<&str, u32>,
        strukt: &str,
        path: &[&str],
        size: u32,
    ) -> Result<u32, BtfError> {
        let full = || format!("{strukt}.{}", path.join("."));
        let mut ty = *structs
            .get(strukt)
            .ok_or_else(|| BtfError::MissingStruct(strukt.to_owned()))?;
        let mut offset = 0;
        for part in path {
            let (off, member_ty) = self.member(ty, part, 0).ok_or_else(|| BtfError::Field {
                path: full(),
                reason: format!("no member {part}"),
            })?;
            offset += off;
            ty = member_ty;
        }
        match self.size_of(ty) {
            Some(actual) if actual == size => Ok(offset),
            actual => Err(BtfError::Field {
                path: full(),
                reason: format!("expected {size} bytes, found {actual:?}"),
            }),
        }
    }

    /// Resolves every offset the BPF program uses.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let structs = self.struct_ids();
        let off = |s: &str, path: &[&str], size| self.offset(&structs, s, path, size);
        // The program treats `struct tcp_sock *` as `struct sock *`; make sure they share a start.
        for (strukt, first) in [
            ("tcp_sock", "inet_conn"),
            ("inet_connection_sock", "icsk_inet"),
            ("inet_sock", "sk"),
            ("sock", "__sk_common"),
        ] {
            let sid = *structs
                .get(strukt)
                .ok_or_else(|| BtfError::MissingStruct(strukt.to_owned()))?;
            match self.member(sid, first, 0) {
                Some((0, _)) => {}
                _ => {
                    return Err(BtfError::Field {
                        path: format!("{strukt}.{first}"),
                        reason: "not at offset 0".into(),
                    });
                }
            }
        }
        let kn_parent =
            off("kernfs_node", &["__parent"], 8).or_else(|_| off("kernfs_node", &["parent"], 8))?;
        Ok(KernelOffsets {
            sock_cgroup: off("sock", &["sk_cgrp_data", "cgroup"], 8)?,
            sock_err: off("sock", &["sk_err"], 4)?,
            cgroup_kn: off("cgroup", &["kn"], 8)?,
            kn_id: off("kernfs_node", &["id"], 8)?,
            kn_parent,
            skc_daddr: off("sock_common", &["skc_daddr"], 4)?,
            skc_rcv_saddr: off("sock_common", &["skc_rcv_saddr"], 4)?,
            skc_dport: off("sock_common", &["skc_dport"], 2)?,
            skc_num: off("sock_common", &["skc_num"], 2)?,
            skc_family: off("sock_common", &["skc_family"], 2)?,
            skc_state: off("sock_common", &["skc_state"], 1)?,
            skc_v6_daddr: off("sock_common", &["skc_v6_daddr"], 16)?,
            skc_v6_rcv_saddr: off("sock_common", &["skc_v6_rcv_saddr"], 16)?,
            skc_cookie: off("sock_common", &["skc_cookie"], 8)?,
            // Moved from struct sock to struct sock_common in 6.x.
            sk_flags: off("sock_common", &["skc_flags"], 8)
                .or_else(|_| off("sock", &["sk_flags"], 8))?,
            sock_keepopen_bit: self.enum_value("sock_flags", "SOCK_KEEPOPEN")?,
            tcp_keepalive_time: off("tcp_sock", &["keepalive_time"], 4)?,
            tcp_keepalive_intvl: off("tcp_sock", &["keepalive_intvl"], 4)?,
            tcp_keepalive_probes: off("tcp_sock", &["keepalive_probes"], 1)?,
            icsk_user_timeout: off("inet_connection_sock", &["icsk_user_timeout"], 4)?,
            icsk_probes_out: off("inet_connection_sock", &["icsk_probes_out"], 1)?,
            sock_err_soft: off("sock", &["sk_err_soft"], 4)?,
            // Without them (a kernel built without network namespaces has no `net` in
            // `skc_net`) listeners are told apart by cgroup and port alone.
            skc_net: off("sock_common", &["skc_net", "net"], 8).unwrap_or(0),
            net_inum: off("net", &["ns", "inum"], 4).unwrap_or(0),
        })
    }

    /// The value of enumerator `name` in `enum <enum_name>`.
    fn enum_value(&self, enum_name: &str, name: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Field {
            path: format!("enum {enum_name}.{name}"),
            reason: "not found".into(),
        };
        let t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_ENUM && self.name(t.name_off) == enum_name)
            .ok_or_else(missing)?;
        (0..t.vlen as usize)
            .map(|i| t.data + 8 * i)
            .find(|&at| self.name(self.u32_at(at)) == name)
            .map(|at| self.u32_at(at + 4))
            .ok_or_else(missing)
    }

    /// Whether the kernel's BTF has a function (used to probe for iterator support).
    pub fn has_func(&self, name: &str) -> bool {
        const KIND_FUNC: u32 = 12;
        self.types
            .iter()
            .any(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name)
    }
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .field("types_start", &self.types_start)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_btf() {
        assert!(matches!(
            Btf::parse(b"not btf at all, really".to_vec()),
            Err(BtfError::Malformed("bad magic"))
        ));
        assert!(matches!(
            Btf::parse(vec![0x9f, 0xeb]),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn running_kernel_offsets_are_plausible() {
        let btf = Btf::from_sys_fs().expect("this project requires a kernel with BTF");
        let off = btf.kernel_offsets().expect("offsets");
        // sock_common's layout has been stable for years; these anchor the reader.
        assert_eq!(off.skc_daddr, 0);
        assert_eq!(off.skc_rcv_saddr, 4);
        assert_eq!(off.skc_dport, 12);
        assert_eq!(off.skc_num, 14);
        assert_eq!(off.skc_family, 16);
        assert_eq!(off.skc_state, 18);
        assert!(off.sock_cgroup > off.skc_v6_rcv_saddr);
        assert_eq!(
            off.sock_keepopen_bit, 3,
            "SOCK_KEEPOPEN has been bit 3 forever"
        );
        assert!(off.tcp_keepalive_intvl > off.icsk_user_timeout);
        assert!(
            off.skc_net > off.skc_state,
            "this kernel has network namespaces"
        );
        assert!(off.net_inum > 0);
        assert!(btf.has_func("bpf_iter_tcp"));
    }
}
