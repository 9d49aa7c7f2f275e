//! An interpreter of classic BPF seccomp programs, as the kernel runs them
//! on a `struct seccomp_data`: what a compiled profile answers to a given
//! syscall. [`super::seccomp`] asks it whether a profile lets the restorer
//! finish once the profile is installed. It runs nothing and loads nothing.

/// `struct seccomp_data` (x86_64 layout, 64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeccompData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `SECCOMP_RET_ACTION_FULL`.
pub const RET_ACTION_FULL: u32 = 0xffff_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;

impl SeccompData {
    pub fn x86_64(nr: i64, args: &[u64]) -> SeccompData {
        let mut all = [0u64; 6];
        all[..args.len().min(6)].copy_from_slice(&args[..args.len().min(6)]);
        SeccompData {
            nr: nr as i32,
            arch: AUDIT_ARCH_X86_64,
            instruction_pointer: 0,
            args: all,
        }
    }

    /// The 32-bit word at byte offset `k`, as `BPF_LD | BPF_W | BPF_ABS` loads it.
    fn word(&self, k: u32) -> Option<u32> {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&self.nr.to_ne_bytes());
        bytes[4..8].copy_from_slice(&self.arch.to_ne_bytes());
        bytes[8..16].copy_from_slice(&self.instruction_pointer.to_ne_bytes());
        for (i, a) in self.args.iter().enumerate() {
            bytes[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let k = k as usize;
        if !k.is_multiple_of(4) || k + 4 > bytes.len() {
            return None;
        }
        Some(u32::from_ne_bytes([
            bytes[k],
            bytes[k + 1],
            bytes[k + 2],
            bytes[k + 3],
        ]))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    #[error("instruction {pc}: opcode {code:#06x} is not one seccomp accepts")]
    BadOpcode { pc: usize, code: u16 },
    #[error("instruction {pc}: load of seccomp_data offset {k} out of bounds")]
    BadOffset { pc: usize, k: u32 },
    #[error("instruction {pc}: scratch slot {k} out of range")]
    BadSlot { pc: usize, k: u32 },
    #[error("instruction {pc}: division by zero")]
    DivideByZero { pc: usize },
    #[error("instruction {pc}: jump past the end of the program")]
    JumpOut { pc: usize },
    #[error("the program ends without returning")]
    NoReturn,
}

/// What `program` (8-byte `struct sock_filter` entries) returns for `data`.
pub fn evaluate(program: &[u8], data: &SeccompData) -> Result<u32, BpfError> {
    let insns: Vec<(u16, u8, u8, u32)> = program
        .chunks_exact(8)
        .map(|c| {
            (
                u16::from_ne_bytes([c[0], c[1]]),
                c[2],
                c[3],
                u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    while let Some(&(code, jt, jf, k)) = insns.get(pc) {
        let bad = || BpfError::BadOpcode { pc, code };
        let slot = |k: u32| {
            if k < 16 {
                Ok(k as usize)
            } else {
                Err(BpfError::BadSlot { pc, k })
            }
        };
        let mut next = pc + 1;
        match code & 0x07 {
            // BPF_LD
            0x00 => {
                a = match code {
                    0x20 => data.word(k).ok_or(BpfError::BadOffset { pc, k })?, // W|ABS
                    0x00 => k,                                                  // W|IMM
                    0x60 => mem[slot(k)?],                                      // W|MEM
                    0x80 => 64,                                                 // W|LEN
                    _ => return Err(bad()),
                }
            }
            // BPF_LDX
            0x01 => {
                x = match code {
                    0x01 => k,
                    0x61 => mem[slot(k)?],
                    0x81 => 64,
                    _ => return Err(bad()),
                }
            }
            0x02 if code == 0x02 => mem[slot(k)?] = a, // BPF_ST
            0x03 if code == 0x03 => mem[slot(k)?] = x, // BPF_STX
            // BPF_ALU
            0x04 => {
                let operand = if code & 0x08 != 0 { x } else { k };
                a = match code & 0xf0 {
                    0x00 => a.wrapping_add(operand),
                    0x10 => a.wrapping_sub(operand),
                    0x20 => a.wrapping_mul(operand),
                    0x30 => a
                        .checked_div(operand)
                        .ok_or(BpfError::DivideByZero { pc })?,
                    0x40 => a | operand,
                    0x50 => a & operand,
                    0x60 => a.checked_shl(operand).unwrap_or(0),
                    0x70 => a.checked_shr(operand).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a
                        .checked_rem(operand)
                        .ok_or(BpfError::DivideByZero { pc })?,
                    0xa0 => a ^ operand,
                    _ => return Err(bad()),
                }
            }
            // BPF_JMP
            0x05 => {
                let operand = if code & 0x08 != 0 { x } else { k };
                let taken = match code & 0xf0 {
                    0x00 => {
                        next = pc + 1 + k as usize;
                        None
                    }
                    0x10 => Some(a == operand),
                    0x20 => Some(a > operand),
                    0x30 => Some(a >= operand),
                    0x40 => Some(a & operand != 0),
                    _ => return Err(bad()),
                };
                if let Some(taken) = taken {
                    next = pc + 1 + if taken { jt } else { jf } as usize;
                }
                if next >= insns.len() {
                    return Err(BpfError::JumpOut { pc });
                }
            }
            // BPF_RET
            0x06 => {
                return match code & 0x18 {
                    0x00 => Ok(k),
                    0x10 => Ok(a),
                    _ => Err(bad()),
                }
            }
            // BPF_MISC
            0x07 => match code {
                0x07 => x = a, // TAX
                0x87 => a = x, // TXA
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        }
        pc = next;
    }
    Err(BpfError::NoReturn)
}

/// Whether `ret` lets the syscall run (allowed, or allowed and logged).
pub fn allows(ret: u32) -> bool {
    matches!(ret & RET_ACTION_FULL, RET_ALLOW | RET_LOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Vec<u8> {
        let mut b = code.to_ne_bytes().to_vec();
        b.extend([jt, jf]);
        b.extend(k.to_ne_bytes());
        b
    }

    #[test]
    fn a_hand_written_program_answers_by_arch_number_and_argument() {
        // arch == x86_64 else kill; nr == 83 (mkdir) -> EPERM; nr == 1 with
        // (arg0 & 0xff) == 2 via scratch and X -> EACCES; else allow.
        let program = [
            insn(0x20, 0, 0, 4),                 // 0 ld arch
            insn(0x15, 1, 0, AUDIT_ARCH_X86_64), // 1 jeq -> 3
            insn(0x06, 0, 0, 0),                 // 2 ret KILL
            insn(0x20, 0, 0, 0),                 // 3 ld nr
            insn(0x15, 0, 1, 83),                // 4 jeq mkdir
            insn(0x06, 0, 0, 0x0005_0001),       // 5 ret ERRNO(1)
            insn(0x15, 0, 6, 1),                 // 6 jeq write else -> 13
            insn(0x20, 0, 0, 16),                // 7 ld arg0 (low)
            insn(0x54, 0, 0, 0xff),              // 8 and #0xff
            insn(0x02, 0, 0, 3),                 // 9 st M[3]
            insn(0x61, 0, 0, 3),                 // 10 ldx M[3]
            insn(0x87, 0, 0, 0),                 // 11 txa
            insn(0x15, 1, 0, 2),                 // 12 jeq 2 -> 14
            insn(0x06, 0, 0, RET_ALLOW),         // 13 ret ALLOW
            insn(0x06, 0, 0, 0x0005_000d),       // 14 ret ERRNO(13)
        ]
        .concat();
        let run = |nr: i64, args: &[u64]| evaluate(&program, &SeccompData::x86_64(nr, args));
        assert_eq!(run(83, &[]), Ok(0x0005_0001));
        assert_eq!(run(1, &[0x102]), Ok(0x0005_000d));
        assert_eq!(run(1, &[0x103]), Ok(RET_ALLOW));
        assert_eq!(run(0, &[]), Ok(RET_ALLOW));
        let mut i386 = SeccompData::x86_64(83, &[]);
        i386.arch = 0x4000_0003;
        assert_eq!(evaluate(&program, &i386), Ok(0));
        assert!(allows(RET_ALLOW) && allows(RET_LOG) && !allows(0x0005_0000));
    }

    #[test]
    fn programs_seccomp_would_refuse_are_errors() {
        let data = SeccompData::x86_64(0, &[]);
        assert_eq!(
            evaluate(&insn(0x20, 0, 0, 2), &data),
            Err(BpfError::BadOffset { pc: 0, k: 2 })
        );
        assert_eq!(
            evaluate(&insn(0x28, 0, 0, 0), &data),
            Err(BpfError::BadOpcode { pc: 0, code: 0x28 })
        );
        assert_eq!(
            evaluate(&insn(0x05, 0, 0, 5), &data),
            Err(BpfError::JumpOut { pc: 0 })
        );
        assert_eq!(
            evaluate(&insn(0x00, 0, 0, 1), &data),
            Err(BpfError::NoReturn)
        );
        assert_eq!(
            evaluate(&[insn(0x34, 0, 0, 0), insn(0x06, 0, 0, 0)].concat(), &data),
            Err(BpfError::DivideByZero { pc: 0 })
        );
    }
}
