//! Builds the restorer blob (`../restorer-blob`) into flat bytes the shim
//! embeds with `include_bytes!`:
//!
//! 1. a nested `cargo build --release` of the blob crate with its own target
//!    dir inside OUT_DIR (sharing the outer one would deadlock on its lock),
//!    static-pie with the crate's linker script so the entry is at offset 0;
//! 2. `objcopy -O binary` to the flat file;
//! 3. a check of the ELF: entry 0, first load at 0, and no relocation other
//!    than R_X86_64_RELATIVE (which the loader applies; the table is emitted
//!    next to the bytes). Anything else fails the build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const R_X86_64_RELATIVE: u32 = 8;
const SHT_RELA: u32 = 4;
const SHT_REL: u32 = 9;
const PT_LOAD: u32 = 1;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: restorer blob: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let blob_dir = manifest_dir.join("../restorer-blob");
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    println!("cargo:rerun-if-changed=../restorer-blob/src");
    println!("cargo:rerun-if-changed=../restorer-blob/Cargo.toml");
    println!("cargo:rerun-if-changed=../restorer-blob/link.ld");
    println!("cargo:rerun-if-changed=build.rs");

    let target_dir = out_dir.join("blob-target");
    let script = blob_dir.join("link.ld");
    let flags = [
        "-Crelocation-model=pie".to_string(),
        "-Cpanic=abort".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static-pie".to_string(),
        "-Clink-arg=-Wl,--no-dynamic-linker".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", script.display()),
    ];
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--offline", "--manifest-path"])
        .arg(blob_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .status()
        .map_err(|e| format!("running {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "nested cargo build of {} failed: {status}",
            blob_dir.display()
        ));
    }
    let elf_path = target_dir.join("release/restorer-blob");
    let elf = fs::read(&elf_path).map_err(|e| format!("reading {}: {e}", elf_path.display()))?;
    let info = check_elf(&elf).map_err(|e| format!("{}: {e}", elf_path.display()))?;

    let bin = out_dir.join("restorer-blob.bin");
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf_path)
        .arg(&bin)
        .status()
        .map_err(|e| format!("running objcopy (binutils): {e}"))?;
    if !status.success() {
        return Err(format!(
            "objcopy -O binary {} failed: {status}",
            elf_path.display()
        ));
    }
    let size = fs::metadata(&bin)
        .map_err(|e| format!("{}: {e}", bin.display()))?
        .len();
    if size > info.mem_size {
        return Err(format!(
            "flat blob is {size} bytes, larger than its memory image {}",
            info.mem_size
        ));
    }
    write_meta(&out_dir.join("restorer_blob_meta.rs"), &bin, &info)?;
    println!(
        "cargo:warning=restorer blob: {size} bytes flat, {} bytes in memory, {} R_X86_64_RELATIVE relocations",
        info.mem_size,
        info.relative.len()
    );
    Ok(())
}

struct ElfInfo {
    mem_size: u64,
    relative: Vec<(u64, u64)>,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, String> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("ELF truncated at {off}"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, String> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("ELF truncated at {off}"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, String> {
    b.get(off..off + 8)
        .map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
        .ok_or_else(|| format!("ELF truncated at {off}"))
}

/// Minimal ELF64 reader: what the loader needs and what it cannot handle.
fn check_elf(b: &[u8]) -> Result<ElfInfo, String> {
    if b.get(0..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    let entry = u64_at(b, 24)?;
    let phoff = u64_at(b, 32)? as usize;
    let shoff = u64_at(b, 40)? as usize;
    let phentsize = u16_at(b, 54)? as usize;
    let phnum = u16_at(b, 56)? as usize;
    let shentsize = u16_at(b, 58)? as usize;
    let shnum = u16_at(b, 60)? as usize;
    if entry != 0 {
        return Err(format!(
            "entry point is {entry:#x}, the loader jumps to offset 0"
        ));
    }
    let mut lowest = u64::MAX;
    let mut mem_size = 0;
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        if u32_at(b, p)? != PT_LOAD {
            continue;
        }
        let vaddr = u64_at(b, p + 16)?;
        let memsz = u64_at(b, p + 40)?;
        lowest = lowest.min(vaddr);
        mem_size = mem_size.max(vaddr + memsz);
    }
    if lowest != 0 {
        return Err(format!("first PT_LOAD at {lowest:#x}, expected 0"));
    }
    let mut relative = Vec::new();
    for i in 0..shnum {
        let s = shoff + i * shentsize;
        let kind = u32_at(b, s + 4)?;
        if kind == SHT_REL {
            return Err("SHT_REL section: the loader applies only RELA R_X86_64_RELATIVE".into());
        }
        if kind != SHT_RELA {
            continue;
        }
        let off = u64_at(b, s + 24)? as usize;
        let size = u64_at(b, s + 32)? as usize;
        for r in (off..off + size).step_by(24) {
            let r_offset = u64_at(b, r)?;
            let r_info = u64_at(b, r + 8)?;
            let addend = u64_at(b, r + 16)?;
            let ty = (r_info & 0xffff_ffff) as u32;
            if ty != R_X86_64_RELATIVE {
                return Err(format!(
                    "relocation type {ty} at {r_offset:#x}: only R_X86_64_RELATIVE is applied by the loader"
                ));
            }
            relative.push((r_offset, addend));
        }
    }
    Ok(ElfInfo { mem_size, relative })
}

fn write_meta(path: &Path, bin: &Path, info: &ElfInfo) -> Result<(), String> {
    let mut s = String::new();
    s.push_str("/// The flat restorer blob (entry at offset 0).\n");
    s.push_str(&format!(
        "pub static BLOB: &[u8] = include_bytes!({:?});\n",
        bin.display().to_string()
    ));
    s.push_str("/// Bytes the blob occupies in memory (flat bytes plus zeroed .bss).\n");
    s.push_str(&format!(
        "pub const BLOB_MEM_SIZE: u64 = {};\n",
        info.mem_size
    ));
    s.push_str(
        "/// `(offset, addend)` of each R_X86_64_RELATIVE: `*(base+offset) = base+addend`.\n",
    );
    s.push_str("pub static BLOB_RELATIVE_RELOCS: &[(u64, u64)] = &[");
    for (o, a) in &info.relative {
        s.push_str(&format!("({o:#x}, {a:#x}), "));
    }
    s.push_str("];\n");
    fs::write(path, s).map_err(|e| format!("writing {}: {e}", path.display()))
}
