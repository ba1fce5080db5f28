//! Sui keys: the Sui CLI's keystore (`sui.keystore`, a JSON array of base64 `flag ‖ secret`
//! entries) read directly, so an operator signs with the wallet they already have; and the
//! per-address signers the backend uses for each transaction's sender.

use std::collections::BTreeMap;
use std::path::Path;

use atoma_crypto::Keypair;
use atoma_ledger::Address;
use sui_crypto::SuiSigner;
use sui_crypto::ed25519::Ed25519PrivateKey;
use sui_sdk_types::{Address as SuiAddress, Transaction, UserSignature};

/// One ed25519 key, as Sui signs with it.
#[derive(Debug, Clone)]
pub struct SuiKey {
    key: Ed25519PrivateKey,
    address: Address,
}

impl SuiKey {
    /// The Sui key of one of our keypairs (the same secret: the same address).
    pub fn from_keypair(kp: &Keypair) -> Self {
        let key = Ed25519PrivateKey::from_base64(&kp.to_keystore_entry())
            .expect("an ed25519 keystore entry of our own making parses");
        let address = Address(key.public_key().derive_address().into_inner());
        debug_assert_eq!(address.0, kp.address());
        Self { key, address }
    }

    pub fn address(&self) -> Address {
        self.address
    }

    pub fn sui_address(&self) -> SuiAddress {
        SuiAddress::new(self.address.0)
    }

    /// Signs a transaction with Sui's intent (`[0,0,0] ‖ BCS(TransactionData)`, Blake2b-256).
    pub fn sign(&self, tx: &Transaction) -> Result<UserSignature, String> {
        self.key.sign_transaction(tx).map_err(|e| e.to_string())
    }
}

/// The keys the backend may sign with, by address.
#[derive(Debug, Clone, Default)]
pub struct Signers {
    keys: BTreeMap<Address, SuiKey>,
}

impl Signers {
    /// Every ed25519 key of a Sui CLI keystore file.
    pub fn from_keystore(path: &Path) -> Result<Self, String> {
        let keys = atoma_crypto::read_keystore(path).map_err(|e| e.to_string())?;
        let mut s = Self::default();
        for k in &keys {
            s.insert(k);
        }
        Ok(s)
    }

    pub fn insert(&mut self, kp: &Keypair) -> Address {
        let k = SuiKey::from_keypair(kp);
        let a = k.address();
        self.keys.insert(a, k);
        a
    }

    pub fn get(&self, who: Address) -> Option<&SuiKey> {
        self.keys.get(&who)
    }

    pub fn addresses(&self) -> impl Iterator<Item = Address> + '_ {
        self.keys.keys().copied()
    }
}
