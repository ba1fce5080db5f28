//! Move abort codes of the `db` module and the ledger's named errors, both ways: the client turns
//! a failed transaction's abort code into a [`LedgerError`]; the test double turns the embedded
//! ledger's refusal into the code the contract would abort with.
//!
//! The deployed contract numbers its errors `312012_000 + n` (db.move `EBase`). Refusals it has
//! no code for (our extra rules: collateral, disputes' oracle, expiry) use `312012_100 + n`, the
//! extended contract's range. An abort carries only its code; the client fills the error's
//! fields from what it knows of the call ([`AbortContext`]), and the execution error's
//! description (the test double puts the ledger's message there) for `Invalid`.

use atoma_ledger::{Address, LedgerError, NodeSmallId, SecurityLevel, StackSmallId, TaskSmallId};

/// The contract's `EBase`.
pub const E_BASE: u64 = 312_012_000;
/// First code of the extended contract's own errors.
pub const E_EXT: u64 = E_BASE + 100;

/// What the client knows of the call that aborted, to fill the error's fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct AbortContext {
    pub sender: Option<Address>,
    pub node: Option<NodeSmallId>,
    pub task: Option<TaskSmallId>,
    pub stack: Option<StackSmallId>,
    /// Units or price of the call (a purchase's units, a claim's units).
    pub units: u64,
    pub price: u64,
}

/// The abort code the contract (deployed where it has one, else extended) raises for `e`, or
/// `None` for errors that are not aborts (storage, unavailability).
pub fn code_of(e: &LedgerError) -> Option<u64> {
    use LedgerError as L;
    let n = match e {
        L::TaskDeprecated(_) => 15,
        L::AlreadySubscribed { .. } => 16,
        L::TaskNotFound(_) => 17,
        L::NotSubscribed { .. } => 18,
        L::NoEligibleNodes { .. } => 22,
        L::NodeNotSelectedForStack { .. } => 23,
        L::TooManyComputeUnits { .. } => 25,
        L::StackNotFound(_) => 27,
        L::NoDispute(_) => 28,
        L::DisputeWindowClosed { .. } => 29,
        L::NotRequestedAttestor { .. } => 30,
        L::InDispute(_) => 31,
        L::DisputeWindowOpen { .. } => 32,
        L::Invalid(_) => 37,
        L::ReputationTooLow { .. } => 38,
        L::InsufficientBalance { .. } => 40,
        L::NotWhitelisted { .. } => 45,
        L::WrongSecurityLevel { .. } => 47,
        L::StackAlreadyClaimed(_) => 53,
        L::AlreadyInEchelon { .. } => 9,
        L::NodeNotFound(_) => 100,
        L::NotNodeOwner { .. } => 101,
        L::InsufficientCollateral { .. } => 102,
        L::CollateralLocked { .. } => 103,
        L::NotStackOwner { .. } => 104,
        L::TicketExists(_) => 105,
        L::NoTicket(_) => 106,
        L::AlreadyAttested { .. } => 107,
        L::NotExpired { .. } => 108,
        L::NotTheOracle { .. } => 109,
        L::OracleDeadline { .. } => 110,
        L::NotYet(_) => 111,
        L::NotSupported(_) | L::Storage(_) | L::Unavailable(_) => return None,
    };
    Some(E_BASE + n)
}

/// The named error for an abort `code` of the `db` module, its fields filled from `cx` and
/// `description` (the execution error's text).
pub fn error_of(code: u64, cx: &AbortContext, description: &str) -> LedgerError {
    use LedgerError as L;
    let node = cx.node.unwrap_or(NodeSmallId(0));
    let task = cx.task.unwrap_or(TaskSmallId(0));
    let stack = cx.stack.unwrap_or(StackSmallId(0));
    let Some(n) = code.checked_sub(E_BASE) else {
        return L::Invalid(format!("Move abort {code}: {description}"));
    };
    match n {
        15 | 34 => L::TaskDeprecated(task),
        16 => L::AlreadySubscribed { task, node },
        17 => L::TaskNotFound(task),
        18 => L::NotSubscribed { task, node },
        9 => L::AlreadyInEchelon {
            node,
            model: String::new(),
        },
        14 | 21 | 22 => L::NoEligibleNodes {
            task,
            units: cx.units,
            price: cx.price,
        },
        23 | 33 | 54 => L::NodeNotSelectedForStack {
            stack,
            node,
            selected: NodeSmallId(0),
        },
        24 | 31 | 46 => L::InDispute(stack),
        25 => L::TooManyComputeUnits {
            stack,
            claimed: cx.units,
            units: 0,
        },
        26 | 47 => L::WrongSecurityLevel {
            stack,
            level: SecurityLevel::NoSecurity,
            needed: "SamplingConsensus",
        },
        51 => L::WrongSecurityLevel {
            stack,
            level: SecurityLevel::NoSecurity,
            needed: "ConfidentialCompute",
        },
        27 => L::StackNotFound(stack),
        28 => L::NoDispute(stack),
        29 => L::DisputeWindowClosed {
            stack,
            until: 0,
            epoch: 0,
        },
        30 => L::NotRequestedAttestor { stack, node },
        32 => L::DisputeWindowOpen {
            stack,
            from: 0,
            epoch: 0,
        },
        38 => L::ReputationTooLow {
            node,
            task,
            have: 0,
            need: 0,
        },
        40 => L::InsufficientBalance {
            needed: 0,
            available: 0,
        },
        45 => L::NotWhitelisted { task, node },
        53 => L::StackAlreadyClaimed(stack),
        100 => L::NodeNotFound(node),
        101 => L::NotNodeOwner {
            sender: cx.sender.unwrap_or(Address([0; 32])),
            node,
        },
        102 => L::InsufficientCollateral {
            node,
            have: 0,
            need: 0,
        },
        103 => L::CollateralLocked {
            node,
            reason: description.to_string(),
        },
        104 => L::NotStackOwner {
            sender: cx.sender.unwrap_or(Address([0; 32])),
            stack,
        },
        105 => L::TicketExists(stack),
        106 => L::NoTicket(stack),
        107 => L::AlreadyAttested { stack, node },
        108 => L::NotExpired {
            stack,
            at: 0,
            epoch: 0,
        },
        109 => L::NotTheOracle { stack, node },
        110 => L::OracleDeadline {
            stack,
            deadline: 0,
            epoch: 0,
        },
        111 => L::NotYet("an operation of the extended contract"),
        _ => L::Invalid(if description.is_empty() {
            format!("the contract aborted with code {code} (EBase + {n})")
        } else {
            description.to_string()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_abort_code_maps_back_to_its_variant() {
        let errs = [
            LedgerError::TaskDeprecated(TaskSmallId(1)),
            LedgerError::AlreadySubscribed {
                task: TaskSmallId(1),
                node: NodeSmallId(2),
            },
            LedgerError::TaskNotFound(TaskSmallId(3)),
            LedgerError::InsufficientBalance {
                needed: 5,
                available: 1,
            },
            LedgerError::StackAlreadyClaimed(StackSmallId(4)),
            LedgerError::NotYet("x"),
            LedgerError::Invalid("price must be positive".into()),
            LedgerError::OracleDeadline {
                stack: StackSmallId(1),
                deadline: 3,
                epoch: 4,
            },
        ];
        for e in errs {
            let code = code_of(&e).expect("an abort");
            let back = error_of(code, &AbortContext::default(), &e.to_string());
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e:?} -> {code} -> {back:?}"
            );
        }
        assert!(code_of(&LedgerError::Storage("disk".into())).is_none());
        assert!(matches!(
            error_of(E_BASE + 99, &AbortContext::default(), ""),
            LedgerError::Invalid(_)
        ));
    }
}
