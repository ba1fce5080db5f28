//! The chain over gRPC (`sui.rpc.v2`): owned objects and gas, executing a signed transaction and
//! waiting until it is checkpointed, and turning its effects into the events it emitted or the
//! named error it aborted with.

use std::time::Duration;

use atoma_ledger::{Address, LedgerError};
use futures_util::TryStreamExt;
use sui_rpc::Client;
use sui_rpc::field::{FieldMask, FieldMaskUtil};
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_sdk_types::{Address as SuiAddress, Digest, Transaction, UserSignature};

use crate::abort::{self, AbortContext};
use crate::move_types;
use crate::tx::ObjRef;

/// The SUI gas coin type.
pub const GAS_COIN_TYPE: &str = "0x2::coin::Coin<0x2::sui::SUI>";

/// An owned object as listed: its reference, coin value, BCS contents.
#[derive(Debug, Clone)]
pub struct Owned {
    pub obj: ObjRef,
    pub balance: Option<u64>,
    pub contents: Vec<u8>,
}

fn status_err(what: &str, s: tonic::Status) -> LedgerError {
    LedgerError::Unavailable(format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// An object reference from an RPC object.
pub fn obj_ref(o: &proto::Object) -> Result<ObjRef, LedgerError> {
    let bad = |w: &str| LedgerError::Unavailable(format!("the RPC returned an object without {w}"));
    Ok(ObjRef {
        id: o
            .object_id
            .as_deref()
            .ok_or_else(|| bad("its id"))?
            .parse()
            .map_err(|_| bad("a valid id"))?,
        version: o.version.ok_or_else(|| bad("its version"))?,
        digest: o
            .digest
            .as_deref()
            .ok_or_else(|| bad("its digest"))?
            .parse::<Digest>()
            .map_err(|_| bad("a valid digest"))?,
    })
}

/// Every object of `type_` that `owner` owns.
pub async fn owned(
    client: &Client,
    owner: SuiAddress,
    type_: &str,
) -> Result<Vec<Owned>, LedgerError> {
    let mut req = proto::ListOwnedObjectsRequest::default();
    req.owner = Some(owner.to_string());
    req.object_type = Some(type_.to_string());
    req.read_mask = Some(FieldMask::from_str(
        "object_id,version,digest,contents,balance,object_type",
    ));
    let objs: Vec<proto::Object> = client
        .list_owned_objects(req)
        .try_collect()
        .await
        .map_err(|s| status_err("ListOwnedObjects", s))?;
    objs.iter()
        .map(|o| {
            Ok(Owned {
                obj: obj_ref(o)?,
                balance: o.balance,
                contents: o
                    .contents
                    .as_ref()
                    .and_then(|b| b.value.as_ref())
                    .map(|v| v.to_vec())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The reference gas price of the current epoch.
pub async fn gas_price(client: &mut Client) -> Result<u64, LedgerError> {
    client
        .get_reference_gas_price()
        .await
        .map_err(|s| status_err("GetEpoch", s))
}

/// The shared object's initial shared version (never changes; callers cache it).
pub async fn initial_shared_version(
    client: &mut Client,
    id: SuiAddress,
) -> Result<u64, LedgerError> {
    let mut req = proto::GetObjectRequest::default();
    req.object_id = Some(id.to_string());
    req.read_mask = Some(FieldMask::from_str("owner"));
    let o = client
        .ledger_client()
        .get_object(req)
        .await
        .map_err(|s| status_err("GetObject", s))?
        .into_inner()
        .object
        .unwrap_or_default();
    let owner = o.owner.unwrap_or_default();
    if owner.kind != Some(proto::owner::OwnerKind::Shared as i32) {
        return Err(LedgerError::Invalid(format!(
            "object {id} is not a shared object"
        )));
    }
    owner
        .version
        .ok_or_else(|| LedgerError::Unavailable(format!("object {id}: no initial shared version")))
}

/// Executes a signed transaction and waits until it is in a checkpoint. Submitting the same
/// transaction again is harmless (same digest: the chain returns the first execution).
pub async fn execute(
    client: &mut Client,
    tx: &Transaction,
    sig: &UserSignature,
    timeout: Duration,
) -> Result<proto::ExecutedTransaction, tonic::Status> {
    let mut req = proto::ExecuteTransactionRequest::default();
    req.transaction = Some(tx.clone().into());
    req.signatures = vec![sig.clone().into()];
    req.read_mask = Some(FieldMask::from_str(
        "digest,effects.status,effects.changed_objects,effects.gas_object,events,checkpoint",
    ));
    let resp = client
        .execute_transaction_and_wait_for_checkpoint(req, timeout)
        .await
        .map_err(|e| match e {
            sui_rpc::client::ExecuteAndWaitError::RpcError(s) => s,
            other => tonic::Status::unavailable(other.to_string()),
        })?;
    resp.into_inner()
        .transaction
        .ok_or_else(|| tonic::Status::data_loss("the executed transaction is missing"))
}

/// A `db` event of a transaction: its struct name, BCS contents and sender.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub name: String,
    pub contents: Vec<u8>,
    pub sender: Address,
}

/// Name of a `db` event type (`0x…::db::Name` → `Name`), or `None` for another module.
pub fn db_event_name(event_type: &str) -> Option<&str> {
    let mut parts = event_type.splitn(3, "::");
    let (_pkg, module, name) = (parts.next()?, parts.next()?, parts.next()?);
    (module == "db").then_some(name)
}

/// The raw event of an RPC event, if it is one of the `db` module's.
pub fn raw_event(e: &proto::Event) -> Option<RawEvent> {
    let name = db_event_name(e.event_type.as_deref()?)?.to_string();
    let sender = e
        .sender
        .as_deref()
        .and_then(|s| s.parse::<SuiAddress>().ok())
        .map(|a| Address(a.into_inner()))
        .unwrap_or(Address([0; 32]));
    Some(RawEvent {
        name,
        contents: e
            .contents
            .as_ref()
            .and_then(|b| b.value.as_ref())
            .map(|v| v.to_vec())
            .unwrap_or_default(),
        sender,
    })
}

/// The outcome of an executed transaction: its `db` events decoded, or the named error its
/// Move abort stands for.
pub fn outcome(
    t: &proto::ExecutedTransaction,
    cx: &AbortContext,
) -> Result<Vec<atoma_ledger::LedgerEvent>, LedgerError> {
    let status = t
        .effects
        .as_ref()
        .and_then(|e| e.status.as_ref())
        .ok_or_else(|| LedgerError::Unavailable("the transaction has no effects status".into()))?;
    if status.success != Some(true) {
        let err = status.error.clone().unwrap_or_default();
        let desc = err.description.clone().unwrap_or_default();
        return Err(match err.error_details {
            Some(proto::execution_error::ErrorDetails::Abort(a)) => {
                abort::error_of(a.abort_code.unwrap_or(0), cx, &desc)
            }
            _ => LedgerError::Invalid(format!("the transaction failed: {desc}")),
        });
    }
    let mut out = Vec::new();
    for e in t
        .events
        .as_ref()
        .map(|e| e.events.as_slice())
        .unwrap_or(&[])
    {
        let Some(raw) = raw_event(e) else { continue };
        if move_types::IGNORED_EVENTS.contains(&raw.name.as_str()) {
            continue;
        }
        out.push(
            move_types::decode_event(&raw.name, &raw.contents, raw.sender)
                .map_err(|e| LedgerError::Unavailable(e.to_string()))?,
        );
    }
    Ok(out)
}
