//! Rebuild when the linker changes: a new bpf-linker at the same path links differently.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
