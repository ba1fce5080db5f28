//! Money on the embedded ledger, double-entry: every movement is a `transfer` that debits one
//! account and credits another and is written to the `journal` in the same transaction. The
//! accounts are addresses' balances, stacks' escrow, nodes' collateral, the treasury, and the
//! faucet (`Mint`, whose debits count what was ever created), so
//! `minted = balances + escrow + collateral + treasury` always.

use rusqlite::{Connection, OptionalExtension, params};

use super::{db_err, emit, market, meta, set_meta, to_i64};
use crate::events::LedgerEvent;
use crate::settlement::MoneyTotals;
use crate::types::{Address, Amount, NodeSmallId, StackSmallId};
use crate::{LedgerError, Result};

/// Where money can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Account {
    Balance(Address),
    Escrow(StackSmallId),
    Collateral(NodeSmallId),
    Treasury,
    Mint,
}

impl Account {
    fn key(&self) -> String {
        match self {
            Self::Balance(a) => format!("balance:{a}"),
            Self::Escrow(s) => format!("escrow:{s}"),
            Self::Collateral(n) => format!("collateral:{n}"),
            Self::Treasury => "treasury".into(),
            Self::Mint => "mint".into(),
        }
    }
}

pub(super) fn balance_of(c: &Connection, who: Address) -> Result<u64> {
    Ok(c.query_row(
        "SELECT amount FROM balances WHERE address = ?1",
        [who.to_string()],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map_err(db_err)?
    .unwrap_or(0) as u64)
}

fn collateral_of(c: &Connection, node: NodeSmallId) -> Result<u64> {
    market::get_node(c, node).map(|n| n.collateral.0)
}

/// Moves `amount` from `from` to `to` and journals it under `op`. Refused (and the caller's
/// transaction with it) if `from` holds less.
pub(super) fn transfer(
    c: &Connection,
    op: &str,
    from: Account,
    to: Account,
    amount: u64,
) -> Result<()> {
    if amount == 0 {
        return Ok(());
    }
    let v = to_i64(amount, "amount")?;
    match from {
        Account::Balance(a) => {
            let available = balance_of(c, a)?;
            if available < amount {
                return Err(LedgerError::InsufficientBalance {
                    needed: amount,
                    available,
                });
            }
            c.execute(
                "UPDATE balances SET amount = amount - ?1 WHERE address = ?2",
                params![v, a.to_string()],
            )
            .map_err(db_err)?;
        }
        Account::Escrow(s) => {
            let n = c
                .execute(
                    "UPDATE stacks SET escrow_left = escrow_left - ?1 \
                     WHERE small_id = ?2 AND escrow_left >= ?1",
                    params![v, s.0 as i64],
                )
                .map_err(db_err)?;
            if n != 1 {
                return Err(LedgerError::Storage(format!(
                    "stack {s}'s escrow holds less than {amount} (a ledger invariant broke)"
                )));
            }
        }
        Account::Collateral(node) => {
            let have = collateral_of(c, node)?;
            if have < amount {
                return Err(LedgerError::InsufficientCollateral {
                    node,
                    have,
                    need: amount,
                });
            }
            c.execute(
                "UPDATE nodes SET collateral = collateral - ?1 WHERE small_id = ?2",
                params![v, node.0 as i64],
            )
            .map_err(db_err)?;
        }
        Account::Treasury => {
            let have = meta(c, "treasury")? as u64;
            if have < amount {
                return Err(LedgerError::Storage(format!(
                    "the treasury holds {have}, {amount} needed"
                )));
            }
            set_meta(c, "treasury", (have - amount) as i64)?;
        }
        Account::Mint => {
            let minted = meta(c, "minted")? as u64;
            let total = minted
                .checked_add(amount)
                .filter(|t| i64::try_from(*t).is_ok())
                .ok_or_else(|| LedgerError::Invalid("the money supply would overflow".into()))?;
            set_meta(c, "minted", total as i64)?;
        }
    }
    match to {
        Account::Balance(a) => {
            c.execute(
                "INSERT INTO balances (address, amount) VALUES (?1, ?2) \
                 ON CONFLICT(address) DO UPDATE SET amount = amount + ?2",
                params![a.to_string(), v],
            )
            .map_err(db_err)?;
        }
        Account::Escrow(s) => {
            c.execute(
                "UPDATE stacks SET escrow_left = escrow_left + ?1 WHERE small_id = ?2",
                params![v, s.0 as i64],
            )
            .map_err(db_err)?;
        }
        Account::Collateral(n) => {
            c.execute(
                "UPDATE nodes SET collateral = collateral + ?1 WHERE small_id = ?2",
                params![v, n.0 as i64],
            )
            .map_err(db_err)?;
        }
        Account::Treasury => {
            c.execute(
                "UPDATE meta SET value = value + ?1 WHERE key = 'treasury'",
                [v],
            )
            .map_err(db_err)?;
        }
        Account::Mint => {
            return Err(LedgerError::Storage("money cannot be unminted".into()));
        }
    }
    c.execute(
        "INSERT INTO journal (op, debit, credit, amount) VALUES (?1, ?2, ?3, ?4)",
        params![op, from.key(), to.key(), v],
    )
    .map_err(db_err)?;
    Ok(())
}

pub(super) fn faucet(c: &Connection, to: Address, amount: Amount) -> Result<Amount> {
    let now = balance_of(c, to)?;
    if now
        .checked_add(amount.0)
        .is_none_or(|v| i64::try_from(v).is_err())
    {
        return Err(LedgerError::Invalid("the balance would overflow".into()));
    }
    transfer(c, "faucet", Account::Mint, Account::Balance(to), amount.0)?;
    balance_of(c, to).map(Amount)
}

pub(super) fn deposit_collateral(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    amount: Amount,
) -> Result<Amount> {
    if amount.0 == 0 {
        return Err(LedgerError::Invalid("a deposit must be positive".into()));
    }
    market::owned_node(c, sender, node)?;
    transfer(
        c,
        "deposit_collateral",
        Account::Balance(sender),
        Account::Collateral(node),
        amount.0,
    )?;
    let collateral = Amount(collateral_of(c, node)?);
    emit(
        c,
        &LedgerEvent::NodeCollateralDepositedEvent {
            node_small_id: node,
            amount,
            collateral,
        },
    )?;
    Ok(collateral)
}

pub(super) fn withdraw_collateral(
    c: &Connection,
    sender: Address,
    node: NodeSmallId,
    amount: Amount,
) -> Result<Amount> {
    if amount.0 == 0 {
        return Err(LedgerError::Invalid("a withdrawal must be positive".into()));
    }
    market::owned_node(c, sender, node)?;
    if let Some(t) = super::settle::open_tickets_of(c, node)?.first() {
        let role = if t.selected_node_id == node {
            "it is settling"
        } else {
            "it was asked to attest"
        };
        let what = if t.is_in_dispute {
            "is in dispute"
        } else {
            "is open"
        };
        return Err(LedgerError::CollateralLocked {
            node,
            reason: format!(
                "the settlement of stack {} {what} and {role} it",
                t.stack_small_id
            ),
        });
    }
    transfer(
        c,
        "withdraw_collateral",
        Account::Collateral(node),
        Account::Balance(sender),
        amount.0,
    )?;
    let collateral = Amount(collateral_of(c, node)?);
    emit(
        c,
        &LedgerEvent::NodeCollateralWithdrawnEvent {
            node_small_id: node,
            amount,
            collateral,
        },
    )?;
    Ok(collateral)
}

pub(super) fn totals(c: &Connection) -> Result<MoneyTotals> {
    let sum = |sql: &str| -> Result<u128> {
        c.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .map_err(db_err)
            .map(|v| v.unwrap_or(0) as u128)
    };
    Ok(MoneyTotals {
        minted: meta(c, "minted")? as u128,
        balances: sum("SELECT SUM(amount) FROM balances")?,
        escrow: sum("SELECT SUM(escrow_left) FROM stacks")?,
        collateral: sum("SELECT SUM(collateral) FROM nodes")?,
        treasury: meta(c, "treasury")? as u128,
    })
}
