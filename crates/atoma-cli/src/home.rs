//! The node's data directory (`--home`, `$ATOMA_HOME`, default `~/.local/share/atoma`): named
//! keys in Sui keystore files under `keys/`, the local ledger, the node's state, the config.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use atoma_crypto::{Keypair, address_hex, read_keystore, write_keystore};
use atoma_ledger::Address;

/// Paths under the data directory.
#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    /// The data directory from the flag, `$ATOMA_HOME`, or the default.
    pub fn new(flag: Option<PathBuf>) -> Self {
        let root = flag.unwrap_or_else(|| dirs_default().join("atoma"));
        Self { root }
    }

    pub fn key_path(&self, name: &str) -> PathBuf {
        self.root.join("keys").join(format!("{name}.keystore"))
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.root.join("ledger.db")
    }

    pub fn state_path(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// Loads the key called `name`.
    pub fn key(&self, name: &str) -> anyhow::Result<Keypair> {
        check_name(name)?;
        let p = self.key_path(name);
        if !p.is_file() {
            bail!(
                "no key `{name}` in {}; create it with `atoma keys new {name}`",
                self.root.display()
            );
        }
        read_keystore(&p)?
            .into_iter()
            .next()
            .with_context(|| format!("{} holds no key", p.display()))
    }

    /// Creates the key `name`; refuses to overwrite one.
    pub fn new_key(&self, name: &str) -> anyhow::Result<Keypair> {
        check_name(name)?;
        let p = self.key_path(name);
        if p.exists() {
            bail!("key `{name}` already exists ({})", p.display());
        }
        let k = Keypair::generate()?;
        write_keystore(&p, std::slice::from_ref(&k))?;
        Ok(k)
    }

    /// The key `name`, created if missing.
    pub fn key_or_new(&self, name: &str) -> anyhow::Result<Keypair> {
        if self.key_path(name).is_file() {
            self.key(name)
        } else {
            self.new_key(name)
        }
    }

    /// Names of the stored keys.
    pub fn key_names(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.root.join("keys")) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                if p.extension()? != "keystore" {
                    return None;
                }
                Some(p.file_stem()?.to_string_lossy().into_owned())
            })
            .collect();
        v.sort();
        v
    }

    /// An address given as a key name or as `0x…`.
    pub fn address(&self, key_or_address: &str) -> anyhow::Result<Address> {
        if key_or_address.starts_with("0x") {
            return key_or_address
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e));
        }
        Ok(address_of(&self.key(key_or_address)?))
    }
}

fn dirs_default() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("key names use letters, digits, `-` and `_` only (got `{name}`)");
    }
    Ok(())
}

/// The ledger address of a key.
pub fn address_of(k: &Keypair) -> Address {
    Address(k.address())
}

/// `0x…` of a key.
pub fn hex_of(k: &Keypair) -> String {
    address_hex(&k.address())
}
