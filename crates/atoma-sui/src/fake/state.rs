//! The test double's chain state: objects with owners and versions, executed transactions, the
//! event log, checkpoints, and the embedded ledger that gives the `db` functions their meaning.

use std::collections::{BTreeMap, HashMap};

use atoma_ledger::{Address, EventCursor, Ledger, LedgerEvent, SqliteLedger};
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_sdk_types::{Address as SuiAddress, Digest};

use crate::move_types;

/// Who owns an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjOwner {
    Address(SuiAddress),
    /// Shared, with its initial shared version.
    Shared(u64),
}

impl ObjOwner {
    /// The owner as the RPC reports it.
    pub fn to_proto(self) -> proto::Owner {
        let mut owner = proto::Owner::default();
        match self {
            ObjOwner::Address(a) => {
                owner.kind = Some(proto::owner::OwnerKind::Address as i32);
                owner.address = Some(a.to_string());
            }
            ObjOwner::Shared(v) => {
                owner.kind = Some(proto::owner::OwnerKind::Shared as i32);
                owner.version = Some(v);
            }
        }
        owner
    }
}

/// What an object is, for its type string and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjKind {
    AtomaDb,
    Random,
    ManagerBadge,
    NodeBadge(u64),
    TaskBadge(u64),
    StackBadge(u64),
    /// `Coin<USDC>`: its value is the owner's balance on the embedded ledger, read live.
    Usdc,
    /// `Coin<SUI>` for gas; never charged.
    Gas,
}

#[derive(Debug, Clone)]
pub struct Obj {
    pub kind: ObjKind,
    pub owner: ObjOwner,
    pub version: u64,
    pub digest: Digest,
}

/// Where the contract lives on the fake chain.
#[derive(Debug, Clone)]
pub struct ChainIds {
    pub package: SuiAddress,
    pub db: SuiAddress,
    pub db_initial_shared_version: u64,
    pub random_initial_shared_version: u64,
    pub manager_badge: SuiAddress,
    pub admin: SuiAddress,
    /// The USDC coin type, e.g. `0x…::usdc::USDC`.
    pub usdc_type: String,
    pub chain_id: String,
}

pub const REFERENCE_GAS_PRICE: u64 = 1_000;
pub const GAS_COIN_VALUE: u64 = 1_000_000_000_000;

pub fn object_digest(id: &SuiAddress, version: u64) -> Digest {
    let mut b = id.inner().to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    Digest::new(atoma_crypto::blake2b256(&b))
}

/// The whole fake chain.
pub struct State {
    pub ids: ChainIds,
    pub ledger: SqliteLedger,
    /// Last ledger event turned into a chain event.
    pub ledger_seq: u64,
    pub objects: BTreeMap<SuiAddress, Obj>,
    /// Executed transactions by digest (base58).
    pub txs: HashMap<String, proto::ExecutedTransaction>,
    /// Every event, in order; the event's cursor is its index + 1.
    pub events: Vec<proto::Event>,
    /// Checkpoints so far (one per executed transaction).
    pub checkpoint: u64,
    /// Transactions refused for a stale input version.
    pub stale_refusals: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("objects", &self.objects.len())
            .field("txs", &self.txs.len())
            .field("events", &self.events.len())
            .field("checkpoint", &self.checkpoint)
            .finish()
    }
}

impl State {
    pub fn new(ids: ChainIds, ledger: SqliteLedger) -> Self {
        let mut s = Self {
            ledger,
            ledger_seq: 0,
            objects: BTreeMap::new(),
            txs: HashMap::new(),
            events: Vec::new(),
            checkpoint: 1,
            stale_refusals: 0,
            ids: ids.clone(),
        };
        s.insert(
            ids.db,
            ObjKind::AtomaDb,
            ObjOwner::Shared(ids.db_initial_shared_version),
            ids.db_initial_shared_version,
        );
        s.insert(
            crate::tx::RANDOM_ID,
            ObjKind::Random,
            ObjOwner::Shared(ids.random_initial_shared_version),
            ids.random_initial_shared_version,
        );
        s.insert(
            ids.manager_badge,
            ObjKind::ManagerBadge,
            ObjOwner::Address(ids.admin),
            2,
        );
        s
    }

    pub fn insert(&mut self, id: SuiAddress, kind: ObjKind, owner: ObjOwner, version: u64) {
        self.objects.insert(
            id,
            Obj {
                kind,
                owner,
                version,
                digest: object_digest(&id, version),
            },
        );
    }

    /// The USDC and gas coins of `who`, created on first sight (the fake funds every address's
    /// gas and keeps one USDC coin per address, mirroring its ledger balance).
    pub fn ensure_account(&mut self, who: SuiAddress) {
        for (kind, tag) in [(ObjKind::Usdc, 0xc0u8), (ObjKind::Gas, 0x9a)] {
            let mut seed = who.inner().to_vec();
            seed.push(tag);
            let id = SuiAddress::new(atoma_crypto::blake2b256(&seed));
            if !self.objects.contains_key(&id) {
                self.insert(id, kind, ObjOwner::Address(who), 1);
            }
        }
    }

    pub fn type_of(&self, kind: &ObjKind) -> String {
        let pkg = self.ids.package;
        match kind {
            ObjKind::AtomaDb => format!("{pkg}::db::AtomaDb"),
            ObjKind::Random => "0x2::random::Random".to_string(),
            ObjKind::ManagerBadge => format!("{pkg}::db::AtomaManagerBadge"),
            ObjKind::NodeBadge(_) => format!("{pkg}::db::NodeBadge"),
            ObjKind::TaskBadge(_) => format!("{pkg}::db::TaskBadge"),
            ObjKind::StackBadge(_) => format!("{pkg}::db::StackBadge"),
            ObjKind::Usdc => format!("0x2::coin::Coin<{}>", self.ids.usdc_type),
            ObjKind::Gas => "0x2::coin::Coin<0x2::sui::SUI>".to_string(),
        }
    }

    /// A coin's value: the owner's ledger balance (USDC), or a large constant (gas).
    pub fn coin_value(&self, obj: &Obj) -> Option<u64> {
        match (&obj.kind, obj.owner) {
            (ObjKind::Usdc, ObjOwner::Address(a)) => Some(
                self.ledger
                    .balance(Address(a.into_inner()))
                    .map_or(0, |b| b.0),
            ),
            (ObjKind::Gas, _) => Some(GAS_COIN_VALUE),
            _ => None,
        }
    }

    /// The object as the RPC returns it (every field filled; read masks are not applied).
    pub fn proto_object(&self, id: &SuiAddress, obj: &Obj) -> proto::Object {
        let mut o = proto::Object::default();
        o.object_id = Some(id.to_string());
        o.version = Some(obj.version);
        o.digest = Some(obj.digest.to_string());
        o.object_type = Some(self.type_of(&obj.kind));
        o.owner = Some(obj.owner.to_proto());
        let contents = match &obj.kind {
            ObjKind::NodeBadge(n) | ObjKind::TaskBadge(n) | ObjKind::StackBadge(n) => {
                bcs::to_bytes(&move_types::Badge {
                    id: id.into_inner(),
                    small_id: move_types::SmallId { inner: *n },
                })
                .ok()
            }
            ObjKind::Usdc | ObjKind::Gas => {
                let value = self.coin_value(obj).unwrap_or(0);
                o.balance = Some(value);
                bcs::to_bytes(&move_types::Coin {
                    id: id.into_inner(),
                    value,
                })
                .ok()
            }
            ObjKind::ManagerBadge => Some(id.inner().to_vec()),
            ObjKind::AtomaDb | ObjKind::Random => None,
        };
        if let Some(c) = contents {
            let mut b = proto::Bcs::default();
            b.name = o.object_type.clone();
            b.value = Some(c.into());
            o.contents = Some(b);
        }
        o
    }

    /// Turns the ledger's new events into chain events of transaction `digest` (in checkpoint
    /// `checkpoint`), appends them to the global log and returns them as the transaction
    /// reports them (without checkpoint and indices).
    pub fn drain_events(
        &mut self,
        sender: SuiAddress,
        digest: &str,
        checkpoint: u64,
    ) -> Vec<proto::Event> {
        // The ledger answers in pages: read until it has nothing newer.
        let mut new = Vec::new();
        loop {
            let after = new
                .last()
                .map_or(self.ledger_seq, |r: &atoma_ledger::EventRecord| r.seq);
            let page = self
                .ledger
                .events_after(EventCursor(after), 10_000)
                .unwrap_or_default();
            if page.is_empty() {
                break;
            }
            new.extend(page);
        }
        let mut out = Vec::with_capacity(new.len());
        for (i, rec) in new.into_iter().enumerate() {
            self.ledger_seq = rec.seq;
            let ev = self.chain_event(&rec.event, sender);
            let mut global = ev.clone();
            global.checkpoint = Some(checkpoint);
            global.transaction_digest = Some(digest.to_string());
            global.transaction_index = Some(0);
            global.event_index = Some(i as u32);
            self.events.push(global);
            out.push(ev);
        }
        out
    }

    fn chain_event(&self, event: &LedgerEvent, sender: SuiAddress) -> proto::Event {
        let (name, bytes) =
            move_types::encode_event(event).expect("the embedded ledger's ids are 32 bytes of hex");
        let type_ = format!("{}::db::{name}", self.ids.package);
        let mut e = proto::Event::default();
        e.package_id = Some(self.ids.package.to_string());
        e.module = Some("db".to_string());
        e.sender = Some(sender.to_string());
        e.event_type = Some(type_.clone());
        let mut b = proto::Bcs::default();
        b.name = Some(type_);
        b.value = Some(bytes.into());
        e.contents = Some(b);
        e
    }
}
