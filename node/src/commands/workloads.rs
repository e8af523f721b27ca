//! `aimatrix-node workloads`: the guest programs that ship with the node.

use std::path::PathBuf;
use std::process::ExitCode;

use aimatrix_protocol::hash::Digest;
use anyhow::Context;
use clap::Args;

/// List the wasm guest programs that ship with aimatrix, or write them out to try with `exec`.
#[derive(Debug, Args)]
pub(crate) struct WorkloadsArgs {
    /// Write each module as `<name>.wasm` into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print one JSON object per workload.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: WorkloadsArgs) -> anyhow::Result<ExitCode> {
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    for w in aimatrix_workloads::ALL {
        let digest = Digest::of(w.wasm);
        let written = match &args.out {
            Some(out) => {
                let path = out.join(format!("{}.wasm", w.name));
                std::fs::write(&path, w.wasm)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        if args.json {
            let line = serde_json::json!({
                "name": w.name,
                "bytes": w.wasm.len(),
                "sha256": digest.to_hex(),
                "description": w.description,
                "path": written.as_ref().map(|p| p.display().to_string()),
            });
            println!("{line}");
        } else {
            println!("{:<12} {:>8} bytes  {digest}", w.name, w.wasm.len());
            println!("             {}", w.description);
            if let Some(path) = written {
                println!("             written to {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
