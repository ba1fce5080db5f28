//! `atoma keys new|list|show`: named ed25519 keys in Sui keystore files.

use clap::Subcommand;

use crate::home::{Home, hex_of};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a new key (a Sui ed25519 keypair) called NAME.
    New { name: String },
    /// List the keys and their Sui addresses.
    List,
    /// Show a key's Sui address and public key.
    Show { name: String },
}

pub fn run(home: &Home, cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::New { name } => {
            let k = home.new_key(&name)?;
            println!("{name} {}", hex_of(&k));
            eprintln!("stored in {}", home.key_path(&name).display());
        }
        KeysCommand::List => {
            for name in home.key_names() {
                match home.key(&name) {
                    Ok(k) => println!("{name:<12} {}", hex_of(&k)),
                    Err(e) => println!("{name:<12} unreadable: {e}"),
                }
            }
        }
        KeysCommand::Show { name } => {
            let k = home.key(&name)?;
            let pk: String = k.public_key().iter().map(|b| format!("{b:02x}")).collect();
            println!(
                "name       {name}\naddress    {}\npublic key 0x{pk}\nscheme     ed25519",
                hex_of(&k)
            );
        }
    }
    Ok(())
}
