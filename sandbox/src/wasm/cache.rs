//! The compiled-module cache: each module is compiled at most once per engine variant.
//!
//! In memory, a module's pre-linked [`InstancePre`] is kept per `(digest, engine)`, so a cached
//! job only instantiates. On disk (when a directory is configured), the compiled artifact is
//! stored under a directory named by the engine's compatibility hash, as
//! `<module sha256>.<engine variant>.cwasm`, prefixed by the SHA-256 of the artifact itself.
//! Only this process writes there (the directory is created owner-only); an artifact is loaded
//! only if its checksum matches, otherwise it is recompiled and rewritten. Compiled code that
//! came from anywhere else — in particular from a peer — is never deserialized: peers send
//! wasm bytes, which are compiled here.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aimatrix_protocol::hash::Digest;
use tokio::sync::OnceCell;
use wasmtime::{Engine, InstancePre, Linker, Module};

use super::{EngineKind, ModuleSource, State};
use crate::ExecError;

/// Counters of the cache's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules compiled from wasm bytes.
    pub compiled: u64,
    /// Modules loaded from the on-disk cache.
    pub loaded_from_disk: u64,
    /// Runs served from the in-memory cache.
    pub memory_hits: u64,
}

type Slot = Arc<OnceCell<InstancePre<State>>>;

pub(crate) struct ModuleCache {
    dir: Option<PathBuf>,
    slots: Mutex<HashMap<(Digest, EngineKind), Slot>>,
    compiled: AtomicU64,
    loaded: AtomicU64,
    hits: AtomicU64,
}

impl ModuleCache {
    pub(crate) fn new(dir: Option<PathBuf>) -> Result<Self, ExecError> {
        if let Some(dir) = &dir {
            create_private_dir(dir).map_err(|e| {
                ExecError::Internal(format!("cannot create module cache {}: {e}", dir.display()))
            })?;
        }
        Ok(Self {
            dir,
            slots: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.loaded.load(Ordering::Relaxed),
            memory_hits: self.hits.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn get_or_compile(
        &self,
        engine: &Engine,
        linker: &Linker<State>,
        kind: EngineKind,
        module: &ModuleSource,
    ) -> Result<InstancePre<State>, ExecError> {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| ExecError::Internal("module cache lock poisoned".into()))?;
            slots.entry((module.digest, kind)).or_default().clone()
        };
        if let Some(pre) = slot.get() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(pre.clone());
        }
        let pre = slot
            .get_or_try_init(|| async {
                let compiled = self.load_or_compile(engine, kind, module).await?;
                linker.instantiate_pre(&compiled).map_err(|e| ExecError::Link {
                    name: module.name.clone(),
                    reason: format!("{e:#}"),
                })
            })
            .await?;
        Ok(pre.clone())
    }

    async fn load_or_compile(
        &self,
        engine: &Engine,
        kind: EngineKind,
        module: &ModuleSource,
    ) -> Result<Module, ExecError> {
        let path = self.dir.as_ref().map(|dir| {
            dir.join(engine_tag(engine)).join(format!(
                "{}.{}.cwasm",
                module.digest.to_hex(),
                kind.label()
            ))
        });
        if let Some(loaded) = path.as_deref().and_then(|p| load_artifact(engine, p)) {
            self.loaded.fetch_add(1, Ordering::Relaxed);
            return Ok(loaded);
        }
        let compiled = compile(engine, module).await?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = path {
            if let Err(e) = store_artifact(&compiled, &path) {
                tracing::warn!(path = %path.display(), "cannot write the compiled module cache: {e}");
            }
        }
        Ok(compiled)
    }
}

/// A directory name for the engine's compiled-code compatibility (Wasmtime version, settings).
fn engine_tag(engine: &Engine) -> String {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("engine-{:016x}", hasher.finish())
}

async fn compile(engine: &Engine, module: &ModuleSource) -> Result<Module, ExecError> {
    let invalid = |reason: String| ExecError::InvalidModule { name: module.name.clone(), reason };
    if !module.bytes.starts_with(b"\0asm") {
        return Err(invalid(
            "not a WebAssembly binary (it does not start with the \\0asm magic)".into(),
        ));
    }
    let engine = engine.clone();
    let bytes = module.bytes.clone();
    tokio::task::spawn_blocking(move || Module::from_binary(&engine, &bytes))
        .await
        .map_err(|e| ExecError::Internal(format!("compiler task failed: {e}")))?
        .map_err(|e| invalid(format!("{e:#}")))
}

fn load_artifact(engine: &Engine, path: &Path) -> Option<Module> {
    let file = std::fs::read(path).ok()?;
    if file.len() < 32 {
        return None;
    }
    let (sum, artifact) = file.split_at(32);
    if Digest::of(artifact).0 != sum {
        tracing::warn!(path = %path.display(), "compiled module failed its checksum; recompiling");
        return None;
    }
    deserialize(engine, artifact)
}

/// Deserializes compiled code this process wrote into its own owner-only cache directory and
/// whose checksum was just verified; never called on bytes from elsewhere.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, artifact: &[u8]) -> Option<Module> {
    // SAFETY: `artifact` was produced by `Module::serialize` of this process's engine
    // configuration (the directory is keyed by the engine's compatibility hash and Wasmtime
    // re-checks compatibility), written by this process into an owner-only directory, and its
    // SHA-256 matches the checksum stored with it. It never comes from the network.
    unsafe { Module::deserialize(engine, artifact) }.ok()
}

fn store_artifact(module: &Module, path: &Path) -> std::io::Result<()> {
    let artifact = module.serialize().map_err(std::io::Error::other)?;
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    let mut file = Vec::with_capacity(32 + artifact.len());
    file.extend_from_slice(&Digest::of(&artifact).0);
    file.extend_from_slice(&artifact);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &file)?;
    std::fs::rename(&tmp, path)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}
