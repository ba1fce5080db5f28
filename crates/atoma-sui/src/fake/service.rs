//! The gRPC services of the test double, on `sui-rpc`'s generated server traits: the methods
//! the backend calls (GetServiceInfo, GetObject, GetEpoch, GetTransaction, ListEvents,
//! ListOwnedObjects, ExecuteTransaction, SubscribeCheckpoints). Every other method answers
//! `Unimplemented` (the traits' defaults). Read masks are not applied: every field is filled.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_rpc::proto::sui::rpc::v2::ledger_service_server::LedgerService;
use sui_rpc::proto::sui::rpc::v2::state_service_server::StateService;
use sui_rpc::proto::sui::rpc::v2::subscription_service_server::SubscriptionService;
use sui_rpc::proto::sui::rpc::v2::transaction_execution_service_server::TransactionExecutionService;
use sui_sdk_types::{Address as SuiAddress, StructTag};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::Shared;
use super::state::REFERENCE_GAS_PRICE;

/// Longest page of events one ListEvents answers.
const MAX_EVENTS_PER_PAGE: u32 = 1_000;
const DEFAULT_EVENTS_PER_PAGE: u32 = 50;

#[derive(Clone, Debug)]
pub struct Service(pub Arc<Shared>);

impl Service {
    /// The injected faults: refuse while "unavailable", sleep while "slow".
    async fn gate(&self) -> Result<(), Status> {
        let f = &self.0.faults;
        if f.unavailable.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the test double is set unavailable"));
        }
        let ms = f.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(())
    }
}

fn parse_address(s: &str, what: &str) -> Result<SuiAddress, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("{what} `{s}`: {e}")))
}

fn same_type(a: &str, b: &str) -> bool {
    match (a.parse::<StructTag>(), b.parse::<StructTag>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Whether `e` passes `filter` (terms ORed, literals ANDed; an empty filter passes all).
fn matches(filter: Option<&proto::EventFilter>, e: &proto::Event) -> bool {
    use proto::event_literal::Predicate;
    let Some(f) = filter else { return true };
    if f.terms.is_empty() {
        return true;
    }
    f.terms.iter().any(|t| {
        t.literals.iter().all(|l| {
            let hit = match &l.predicate {
                Some(Predicate::Sender(s)) => {
                    s.address
                        .as_deref()
                        .and_then(|a| a.parse::<SuiAddress>().ok())
                        == e.sender
                            .as_deref()
                            .and_then(|a| a.parse::<SuiAddress>().ok())
                }
                Some(Predicate::EmitModule(m)) => {
                    let Some(want) = m.module.as_deref() else {
                        return false;
                    };
                    let (pkg, module) = want.split_once("::").unwrap_or((want, ""));
                    let pkg_ok = pkg.parse::<SuiAddress>().ok()
                        == e.package_id.as_deref().and_then(|p| p.parse().ok());
                    pkg_ok && (module.is_empty() || e.module.as_deref() == Some(module))
                }
                Some(Predicate::EventType(t)) => {
                    let Some(want) = t.event_type.as_deref() else {
                        return false;
                    };
                    let have = e.event_type.as_deref().unwrap_or("");
                    same_type(want, have) || {
                        // `0xpkg::module` (or `0xpkg`) prefix forms.
                        let mut parts = want.splitn(3, "::");
                        let (p, m) = (parts.next().unwrap_or(""), parts.next());
                        let mut hp = have.splitn(3, "::");
                        let (hpkg, hmod) = (hp.next().unwrap_or(""), hp.next());
                        p.parse::<SuiAddress>().ok() == hpkg.parse().ok()
                            && (m.is_none() || m == hmod)
                            && parts.next().is_none()
                    }
                }
                _ => false,
            };
            hit != l.negated
        })
    })
}

fn cursor_bytes(seq: u64) -> tonic::codegen::Bytes {
    tonic::codegen::Bytes::copy_from_slice(&seq.to_be_bytes())
}

fn parse_cursor(b: &[u8]) -> Result<u64, Status> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| Status::invalid_argument("not a cursor of this server"))
}

#[tonic::async_trait]
impl LedgerService for Service {
    async fn get_service_info(
        &self,
        _req: Request<proto::GetServiceInfoRequest>,
    ) -> Result<Response<proto::GetServiceInfoResponse>, Status> {
        self.gate().await?;
        let s = self.0.lock();
        let mut r = proto::GetServiceInfoResponse::default();
        r.chain_id = Some(s.ids.chain_id.clone());
        r.chain = Some("atoma-test-double".into());
        r.epoch = s.ledger_epoch();
        r.checkpoint_height = Some(s.checkpoint);
        r.lowest_available_checkpoint = Some(0);
        r.server = Some("atoma sui test double".into());
        Ok(Response::new(r))
    }

    async fn get_object(
        &self,
        req: Request<proto::GetObjectRequest>,
    ) -> Result<Response<proto::GetObjectResponse>, Status> {
        self.gate().await?;
        let req = req.into_inner();
        let id = parse_address(req.object_id.as_deref().unwrap_or(""), "object id")?;
        let s = self.0.lock();
        let o = s
            .objects
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("object {id} does not exist")))?;
        if let Some(v) = req.version
            && v != o.version
        {
            return Err(Status::not_found(format!(
                "object {id} at version {v} is not kept (it is at {})",
                o.version
            )));
        }
        let mut r = proto::GetObjectResponse::default();
        r.object = Some(s.proto_object(&id, o));
        Ok(Response::new(r))
    }

    async fn get_transaction(
        &self,
        req: Request<proto::GetTransactionRequest>,
    ) -> Result<Response<proto::GetTransactionResponse>, Status> {
        self.gate().await?;
        let digest = req.into_inner().digest.unwrap_or_default();
        let s = self.0.lock();
        let t = s
            .txs
            .get(&digest)
            .ok_or_else(|| Status::not_found(format!("transaction {digest} is not known")))?;
        let mut r = proto::GetTransactionResponse::default();
        r.transaction = Some(t.clone());
        Ok(Response::new(r))
    }

    async fn get_epoch(
        &self,
        _req: Request<proto::GetEpochRequest>,
    ) -> Result<Response<proto::GetEpochResponse>, Status> {
        self.gate().await?;
        let s = self.0.lock();
        let mut e = proto::Epoch::default();
        e.epoch = s.ledger_epoch();
        e.reference_gas_price = Some(REFERENCE_GAS_PRICE);
        let mut r = proto::GetEpochResponse::default();
        r.epoch = Some(e);
        Ok(Response::new(r))
    }

    async fn list_events(
        &self,
        req: Request<proto::ListEventsRequest>,
    ) -> Result<Response<BoxStream<proto::ListEventsResponse>>, Status> {
        self.gate().await?;
        if self.0.faults.list_events_unavailable.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "the test double's event listing is down",
            ));
        }
        let req = req.into_inner();
        let opts = req.options.unwrap_or_default();
        if opts.before.is_some() || opts.ordering.is_some_and(|o| o != 0 && o != 1) {
            return Err(Status::unimplemented(
                "the test double lists events ascending from `after` only",
            ));
        }
        let after = match opts.after.as_deref() {
            Some(b) if !b.is_empty() => parse_cursor(b)?,
            _ => 0,
        };
        let limit = opts
            .limit
            .unwrap_or(DEFAULT_EVENTS_PER_PAGE)
            .clamp(1, MAX_EVENTS_PER_PAGE) as usize;
        let drop_after = self.0.faults.drop_events_after.swap(0, Ordering::SeqCst);
        let s = self.0.lock();
        let mut frames: Vec<Result<proto::ListEventsResponse, Status>> = Vec::new();
        let mut last = after;
        let mut items = 0;
        for (i, e) in s.events.iter().enumerate().skip(after as usize) {
            let seq = i as u64 + 1;
            last = seq;
            if !matches(req.filter.as_ref(), e) {
                continue;
            }
            if drop_after > 0 && items == drop_after {
                frames.push(Err(Status::unavailable(
                    "the test double dropped the stream",
                )));
                break;
            }
            items += 1;
            let mut f = proto::ListEventsResponse::default();
            f.event = Some(e.clone());
            let mut w = proto::Watermark::default();
            w.cursor = Some(cursor_bytes(seq));
            f.watermark = Some(w);
            if items == limit {
                let mut end = proto::QueryEnd::default();
                end.reason = Some(proto::QueryEndReason::ItemLimit as i32);
                f.end = Some(end);
                frames.push(Ok(f));
                break;
            }
            frames.push(Ok(f));
        }
        let ended = matches!(frames.last(), Some(Ok(f)) if f.end.is_some())
            || matches!(frames.last(), Some(Err(_)));
        if !ended {
            let mut f = proto::ListEventsResponse::default();
            let mut w = proto::Watermark::default();
            w.cursor = Some(cursor_bytes(last));
            f.watermark = Some(w);
            let mut end = proto::QueryEnd::default();
            end.reason = Some(proto::QueryEndReason::LedgerTip as i32);
            f.end = Some(end);
            frames.push(Ok(f));
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(frames))))
    }
}

#[tonic::async_trait]
impl StateService for Service {
    async fn list_owned_objects(
        &self,
        req: Request<proto::ListOwnedObjectsRequest>,
    ) -> Result<Response<proto::ListOwnedObjectsResponse>, Status> {
        self.gate().await?;
        let req = req.into_inner();
        let owner = parse_address(req.owner.as_deref().unwrap_or(""), "owner")?;
        let stale = self
            .0
            .faults
            .stale_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let mut s = self.0.lock();
        s.ensure_account(owner);
        let mut r = proto::ListOwnedObjectsResponse::default();
        for (id, o) in &s.objects {
            if o.owner != super::state::ObjOwner::Address(owner) {
                continue;
            }
            if let Some(t) = req.object_type.as_deref()
                && !same_type(t, &s.type_of(&o.kind))
            {
                continue;
            }
            let mut obj = s.proto_object(id, o);
            if stale && o.version > 1 {
                let v = o.version - 1;
                obj.version = Some(v);
                obj.digest = Some(super::state::object_digest(id, v).to_string());
            }
            r.objects.push(obj);
        }
        Ok(Response::new(r))
    }
}

#[tonic::async_trait]
impl TransactionExecutionService for Service {
    async fn execute_transaction(
        &self,
        req: Request<proto::ExecuteTransactionRequest>,
    ) -> Result<Response<proto::ExecuteTransactionResponse>, Status> {
        self.gate().await?;
        let f = &self.0.faults;
        f.executes_received.fetch_add(1, Ordering::SeqCst);
        let ms = f.execute_delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let req = req.into_inner();
        let executed = self.0.lock().execute(&req)?;
        let mut cp = proto::Checkpoint::default();
        cp.sequence_number = executed.checkpoint;
        let mut t = proto::ExecutedTransaction::default();
        t.digest = executed.digest.clone();
        cp.transactions.push(t);
        cp.summary = Some(proto::CheckpointSummary::default());
        // Nobody listening is fine.
        let _ = self.0.checkpoints.send(cp);
        let mut r = proto::ExecuteTransactionResponse::default();
        r.transaction = Some(executed);
        Ok(Response::new(r))
    }
}

#[tonic::async_trait]
impl SubscriptionService for Service {
    async fn subscribe_checkpoints(
        &self,
        _req: Request<proto::SubscribeCheckpointsRequest>,
    ) -> Result<Response<BoxStream<proto::SubscribeCheckpointsResponse>>, Status> {
        self.gate().await?;
        let rx = self.0.checkpoints.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|cp| async move {
            let cp = cp.ok()?;
            let mut r = proto::SubscribeCheckpointsResponse::default();
            r.cursor = cp.sequence_number;
            r.checkpoint = Some(cp);
            Some(Ok(r))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
