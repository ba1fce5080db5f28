//! The market on the embedded ledger: nodes and their echelons, tasks, subscriptions, and
//! stacks (a node sampled uniformly among the eligible subscribers, the fee escrowed).

use rusqlite::{Connection, OptionalExtension, params};

use super::money::{Account, transfer};
use super::{current_epoch, db_err, draw, emit, load_params, object_id, to_i64};
use crate::events::LedgerEvent;
use crate::types::*;
use crate::{LedgerError, Result};

pub(super) fn get_node(c: &Connection, id: NodeSmallId) -> Result<Node> {
    c.query_row(
        "SELECT owner, badge_id, disabled, collateral, settled_on_time, attestations_made, \
         attestations_missed, disputes_lost, public_url FROM nodes WHERE small_id = ?1",
        [id.0 as i64],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, i64>(3)?,
                [
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ],
                r.get::<_, Option<String>>(8)?,
            ))
        },
    )
    .optional()
    .map_err(db_err)?
    .map(
        |(owner, badge_id, disabled, collateral, counts, public_url)| {
            let record = Reputation {
                settled_on_time: counts[0] as u64,
                attestations_made: counts[1] as u64,
                attestations_missed: counts[2] as u64,
                disputes_lost: counts[3] as u64,
            };
            Ok(Node {
                small_id: id,
                owner: owner.parse().map_err(LedgerError::Storage)?,
                badge_id,
                reputation_score: record.score(),
                is_disabled: disabled,
                collateral: Amount(collateral as u64),
                record,
                public_url,
            })
        },
    )
    .ok_or(LedgerError::NodeNotFound(id))?
}

pub(super) fn owned_node(c: &Connection, sender: Address, id: NodeSmallId) -> Result<Node> {
    let node = get_node(c, id)?;
    if node.owner != sender {
        return Err(LedgerError::NotNodeOwner { sender, node: id });
    }
    Ok(node)
}

pub(super) fn nodes_of(c: &Connection, owner: Address) -> Result<Vec<Node>> {
    let mut stmt = c
        .prepare("SELECT small_id FROM nodes WHERE owner = ?1 ORDER BY small_id")
        .map_err(db_err)?;
    let ids: Vec<i64> = stmt
        .query_map([owner.to_string()], |r| r.get(0))
        .map_err(db_err)?
        .collect::<std::result::Result<_, _>>()
        .map_err(db_err)?;
    ids.into_iter()
        .map(|id| get_node(c, NodeSmallId(id as u64)))
        .collect()
}

pub(super) fn get_task(c: &Connection, id: TaskSmallId) -> Result<Task> {
    let row = c
        .query_row(
            "SELECT role, model_name, security_level, min_reputation, is_public, is_deprecated, \
             whitelist, min_collateral FROM tasks WHERE small_id = ?1",
            [id.0 as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, bool>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            },
        )
        .optional()
        .map_err(db_err)?
        .ok_or(LedgerError::TaskNotFound(id))?;
    let bad = |what: &str| LedgerError::Storage(format!("task {id}: corrupt {what}"));
    Ok(Task {
        small_id: id,
        role: TaskRole::from_code(row.0 as u16).ok_or_else(|| bad("role"))?,
        model_name: row.1,
        security_level: SecurityLevel::from_code(row.2 as u16).ok_or_else(|| bad("level"))?,
        minimum_reputation_score: row.3 as u8,
        is_public: row.4,
        is_deprecated: row.5,
        whitelist: serde_json::from_str(&row.6).map_err(|_| bad("whitelist"))?,
        minimum_collateral: Amount(row.7 as u64),
    })
}

pub(super) fn get_subscription(
    c: &Connection,
    task: TaskSmallId,
    node: NodeSmallId,
) -> Result<Option<Subscription>> {
    c.query_row(
        "SELECT price, max_units FROM subscriptions WHERE task_small_id = ?1 AND node_small_id = ?2",
        params![task.0 as i64, node.0 as i64],
        |r| {
            Ok(Subscription {
                task_small_id: task,
                node_small_id: node,
                price_per_one_million_compute_units: Amount(r.get::<_, i64>(0)? as u64),
                max_num_compute_units: ComputeUnits(r.get::<_, i64>(1)? as u64),
            })
        },
    )
    .optional()
    .map_err(db_err)
}

pub(super) fn subscriptions(c: &Connection, task: TaskSmallId) -> Result<Vec<Subscription>> {
    get_task(c, task)?;
    let mut stmt = c
        .prepare(
            "SELECT node_small_id FROM subscriptions WHERE task_small_id = ?1 \
             ORDER BY node_small_id",
        )
        .map_err(db_err)?;
    let nodes: Vec<i64> = stmt
        .query_map([task.0 as i64], |r| r.get(0))
        .map_err(db_err)?
        .collect::<std::result::Result<_, _>>()
        .map_err(db_err)?;
    nodes
        .into_iter()
        .filter_map(|n| get_subscription(c, task, NodeSmallId(n as u64)).transpose())
        .collect()
}

pub(super) fn get_stack(c: &Connection, id: StackSmallId) -> Result<Stack> {
    c.query_row(
        "SELECT stack_id, owner, task_small_id, selected_node_id, num_compute_units, \
         price, escrowed, is_claimed, created_epoch FROM stacks WHERE small_id = ?1",
        [id.0 as i64],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                [
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ],
                r.get::<_, bool>(7)?,
                r.get::<_, i64>(8)?,
            ))
        },
    )
    .optional()
    .map_err(db_err)?
    .ok_or(LedgerError::StackNotFound(id))
    .and_then(|(stack_id, owner, v, is_claimed, created)| {
        Ok(Stack {
            small_id: id,
            stack_id,
            owner: owner.parse().map_err(LedgerError::Storage)?,
            task_small_id: TaskSmallId(v[0] as u64),
            selected_node_id: NodeSmallId(v[1] as u64),
            num_compute_units: ComputeUnits(v[2] as u64),
            price_per_one_million_compute_units: Amount(v[3] as u64),
            escrowed: Amount(v[4] as u64),
            is_claimed,
            created_at_epoch: created as u64,
        })
    })
}

/// The collateral a node needs for `task`: the task's minimum or the ledger's, the larger.
pub(super) fn required_collateral(c: &Connection, task: &Task) -> Result<u64> {
    Ok(task
        .minimum_collateral
        .0
        .max(load_params(c)?.min_collateral.0))
}

pub(super) fn register_node(tx: &Connection, sender: Address) -> Result<Node> {
    tx.execute(
        "INSERT INTO nodes (owner, badge_id, reputation) VALUES (?1, '', ?2)",
        params![sender.to_string(), i64::from(REPUTATION_SCORE_START)],
    )
    .map_err(db_err)?;
    let id = NodeSmallId(tx.last_insert_rowid() as u64);
    let badge_id = object_id(tx, "node-badge", id.0)?;
    tx.execute(
        "UPDATE nodes SET badge_id = ?1 WHERE small_id = ?2",
        params![badge_id, id.0 as i64],
    )
    .map_err(db_err)?;
    emit(
        tx,
        &LedgerEvent::NodeRegisteredEvent {
            badge_id,
            node_small_id: id,
            sender,
        },
    )?;
    get_node(tx, id)
}

pub(super) fn add_node_to_model(
    tx: &Connection,
    sender: Address,
    node: NodeSmallId,
    model_name: &str,
    echelon_id: u64,
) -> Result<()> {
    if model_name.is_empty() {
        return Err(LedgerError::Invalid("the model name is empty".into()));
    }
    owned_node(tx, sender, node)?;
    let n = tx
        .execute(
            "INSERT OR IGNORE INTO node_models VALUES (?1, ?2, ?3)",
            params![node.0 as i64, model_name, to_i64(echelon_id, "echelon")?],
        )
        .map_err(db_err)?;
    if n == 0 {
        return Err(LedgerError::AlreadyInEchelon {
            node,
            model: model_name.to_string(),
        });
    }
    emit(
        tx,
        &LedgerEvent::NodeSubscribedToModelEvent {
            node_small_id: node,
            model_name: model_name.to_string(),
            echelon_id,
        },
    )
}

pub(super) fn set_node_public_url(
    tx: &Connection,
    sender: Address,
    node: NodeSmallId,
    url: &str,
) -> Result<()> {
    let ok_scheme = url.starts_with("http://") || url.starts_with("https://");
    if !ok_scheme || url.len() > 512 || url.chars().any(char::is_whitespace) {
        return Err(LedgerError::Invalid(format!(
            "`{url}` is not an http(s) URL of at most 512 characters"
        )));
    }
    owned_node(tx, sender, node)?;
    tx.execute(
        "UPDATE nodes SET public_url = ?1 WHERE small_id = ?2",
        params![url, node.0 as i64],
    )
    .map_err(db_err)?;
    emit(
        tx,
        &LedgerEvent::NodePublicUrlUpdatedEvent {
            node_small_id: node,
            public_url: url.to_string(),
        },
    )
}

pub(super) fn create_task(tx: &Connection, t: &NewTask) -> Result<Task> {
    if t.minimum_reputation_score > 100 {
        return Err(LedgerError::Invalid(
            "minimum reputation score must be at most 100".into(),
        ));
    }
    tx.execute(
        "INSERT INTO tasks (task_id, role, model_name, security_level, min_reputation, \
         is_public, min_collateral) VALUES ('', ?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            t.role.code(),
            t.model_name,
            t.security_level.code(),
            t.minimum_reputation_score,
            t.is_public,
            to_i64(t.minimum_collateral.0, "minimum collateral")?
        ],
    )
    .map_err(db_err)?;
    let id = TaskSmallId(tx.last_insert_rowid() as u64);
    let task_id = object_id(tx, "task", id.0)?;
    tx.execute(
        "UPDATE tasks SET task_id = ?1 WHERE small_id = ?2",
        params![task_id, id.0 as i64],
    )
    .map_err(db_err)?;
    emit(
        tx,
        &LedgerEvent::TaskRegisteredEvent {
            task_id,
            task_small_id: id,
            role: t.role,
            model_name: t.model_name.clone(),
            security_level: t.security_level,
            minimum_reputation_score: Some(t.minimum_reputation_score),
        },
    )?;
    get_task(tx, id)
}

pub(super) fn whitelist_nodes_for_task(
    tx: &Connection,
    task: TaskSmallId,
    nodes: &[NodeSmallId],
) -> Result<()> {
    let mut t = get_task(tx, task)?;
    if t.is_public {
        return Err(LedgerError::Invalid(format!(
            "task {task} is public; whitelists apply to private tasks"
        )));
    }
    for n in nodes {
        get_node(tx, *n)?;
        if !t.whitelist.contains(n) {
            t.whitelist.push(*n);
        }
    }
    let list =
        serde_json::to_string(&t.whitelist).map_err(|e| LedgerError::Storage(e.to_string()))?;
    tx.execute(
        "UPDATE tasks SET whitelist = ?1 WHERE small_id = ?2",
        params![list, task.0 as i64],
    )
    .map_err(db_err)?;
    Ok(())
}

pub(super) fn deprecate_task(tx: &Connection, task: TaskSmallId) -> Result<()> {
    get_task(tx, task)?;
    tx.execute(
        "UPDATE tasks SET is_deprecated = 1 WHERE small_id = ?1",
        [task.0 as i64],
    )
    .map_err(db_err)?;
    let task_id: String = tx
        .query_row(
            "SELECT task_id FROM tasks WHERE small_id = ?1",
            [task.0 as i64],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    emit(
        tx,
        &LedgerEvent::TaskDeprecationEvent {
            task_id,
            task_small_id: task,
            epoch: current_epoch(tx)?,
        },
    )
}

pub(super) fn subscribe_node_to_task(
    tx: &Connection,
    sender: Address,
    node: NodeSmallId,
    task: TaskSmallId,
    price: Amount,
) -> Result<Subscription> {
    if price.0 == 0 {
        return Err(LedgerError::Invalid("the price must be positive".into()));
    }
    let n = owned_node(tx, sender, node)?;
    let t = get_task(tx, task)?;
    if t.is_deprecated {
        return Err(LedgerError::TaskDeprecated(task));
    }
    if n.reputation_score < t.minimum_reputation_score {
        return Err(LedgerError::ReputationTooLow {
            node,
            task,
            have: n.reputation_score,
            need: t.minimum_reputation_score,
        });
    }
    if !t.is_public && !t.whitelist.contains(&node) {
        return Err(LedgerError::NotWhitelisted { task, node });
    }
    if get_subscription(tx, task, node)?.is_some() {
        return Err(LedgerError::AlreadySubscribed { task, node });
    }
    let sub = Subscription {
        task_small_id: task,
        node_small_id: node,
        price_per_one_million_compute_units: price,
        max_num_compute_units: COMPUTE_UNITS_PER_STACK,
    };
    tx.execute(
        "INSERT INTO subscriptions VALUES (?1, ?2, ?3, ?4)",
        params![
            task.0 as i64,
            node.0 as i64,
            to_i64(price.0, "price")?,
            sub.max_num_compute_units.0 as i64
        ],
    )
    .map_err(db_err)?;
    emit(
        tx,
        &LedgerEvent::NodeSubscribedToTaskEvent {
            task_small_id: task,
            node_small_id: node,
            price_per_one_million_compute_units: price,
            max_num_compute_units: sub.max_num_compute_units,
        },
    )?;
    Ok(sub)
}

pub(super) fn update_node_subscription(
    tx: &Connection,
    sender: Address,
    node: NodeSmallId,
    task: TaskSmallId,
    price: Amount,
) -> Result<Subscription> {
    if price.0 == 0 {
        return Err(LedgerError::Invalid("the price must be positive".into()));
    }
    owned_node(tx, sender, node)?;
    let mut sub =
        get_subscription(tx, task, node)?.ok_or(LedgerError::NotSubscribed { task, node })?;
    sub.price_per_one_million_compute_units = price;
    tx.execute(
        "UPDATE subscriptions SET price = ?1 WHERE task_small_id = ?2 AND node_small_id = ?3",
        params![to_i64(price.0, "price")?, task.0 as i64, node.0 as i64],
    )
    .map_err(db_err)?;
    emit(
        tx,
        &LedgerEvent::NodeSubscriptionUpdatedEvent {
            task_small_id: task,
            node_small_id: node,
            price_per_one_million_compute_units: price,
            max_num_compute_units: sub.max_num_compute_units,
        },
    )?;
    Ok(sub)
}

pub(super) fn unsubscribe_node_from_task(
    tx: &Connection,
    sender: Address,
    node: NodeSmallId,
    task: TaskSmallId,
) -> Result<()> {
    owned_node(tx, sender, node)?;
    let n = tx
        .execute(
            "DELETE FROM subscriptions WHERE task_small_id = ?1 AND node_small_id = ?2",
            params![task.0 as i64, node.0 as i64],
        )
        .map_err(db_err)?;
    if n == 0 {
        return Err(LedgerError::NotSubscribed { task, node });
    }
    emit(
        tx,
        &LedgerEvent::NodeUnsubscribedFromTaskEvent {
            task_small_id: task,
            node_small_id: node,
        },
    )
}

/// Small ids from a one-column query.
pub(super) fn ids(c: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<u64>> {
    let mut stmt = c.prepare(sql).map_err(db_err)?;
    stmt.query_map(args, |r| r.get::<_, i64>(0))
        .map_err(db_err)?
        .map(|r| r.map(|v| v as u64).map_err(db_err))
        .collect()
}

pub(super) fn acquire_stack(tx: &Connection, buyer: Address, req: &StackRequest) -> Result<Stack> {
    let units = req.num_compute_units;
    if units.0 == 0 {
        return Err(LedgerError::Invalid(
            "a stack needs at least one compute unit".into(),
        ));
    }
    if req.price_per_one_million_compute_units.0 == 0 {
        return Err(LedgerError::Invalid("the price must be positive".into()));
    }
    let task = get_task(tx, req.task_small_id)?;
    if task.is_deprecated {
        return Err(LedgerError::TaskDeprecated(task.small_id));
    }
    let price = req.price_per_one_million_compute_units;
    let fee = task
        .security_level
        .stack_fee(price, units)
        .filter(|f| i64::try_from(f.0).is_ok())
        .ok_or_else(|| LedgerError::Invalid("the stack's fee overflows".into()))?;
    let min_collateral = required_collateral(tx, &task)?;
    let eligible = ids(
        tx,
        "SELECT s.node_small_id FROM subscriptions s JOIN nodes n \
         ON n.small_id = s.node_small_id WHERE s.task_small_id = ?1 \
         AND s.price <= ?2 AND s.max_units >= ?3 AND n.disabled = 0 \
         AND n.collateral >= ?4 AND n.reputation >= ?5 ORDER BY s.node_small_id",
        params![
            task.small_id.0 as i64,
            to_i64(price.0, "price")?,
            to_i64(units.0, "units")?,
            to_i64(min_collateral, "collateral")?,
            i64::from(task.minimum_reputation_score)
        ],
    )?;
    if eligible.is_empty() {
        return Err(LedgerError::NoEligibleNodes {
            task: task.small_id,
            units: units.0,
            price: price.0,
        });
    }
    let next: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(small_id), 0) + 1 FROM stacks",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let pick = draw(tx, "stack-node", &[next as u64])?;
    let selected = NodeSmallId(eligible[(pick % eligible.len() as u64) as usize]);
    let stack_id = object_id(tx, "stack", next as u64)?;
    let epoch = current_epoch(tx)?;
    tx.execute(
        "INSERT INTO stacks (small_id, stack_id, owner, task_small_id, selected_node_id, \
         num_compute_units, price, escrowed, created_epoch) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            next,
            stack_id,
            buyer.to_string(),
            task.small_id.0 as i64,
            selected.0 as i64,
            units.0 as i64,
            price.0 as i64,
            fee.0 as i64,
            to_i64(epoch, "epoch")?
        ],
    )
    .map_err(db_err)?;
    let small_id = StackSmallId(next as u64);
    transfer(
        tx,
        "acquire_stack",
        Account::Balance(buyer),
        Account::Escrow(small_id),
        fee.0,
    )?;
    emit(
        tx,
        &LedgerEvent::StackCreatedEvent {
            stack_id,
            stack_small_id: small_id,
            owner: buyer,
            task_small_id: task.small_id,
            selected_node_id: selected,
            num_compute_units: units,
            price_per_one_million_compute_units: price,
        },
    )?;
    get_stack(tx, small_id)
}
