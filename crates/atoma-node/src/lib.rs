//! One Atoma node. So far: `meter`, the durable per-stack accounting of compute units and the
//! request log used for settlement. The HTTP API, the ledger follower and the settlement duties
//! come next (issue "Node v1").

pub mod meter;
