//! Fenced writes: a writer holding the sink lease writes the table only while no writer
//! with a newer fencing token (the lease's generation) has claimed it.
//!
//! A fence item of the sink's own (`PK = toolrank#sink`, `SK = Fence` or `Fence#NAME`)
//! holds the largest token claimed. A new holder claims its token there before it reads
//! what the table holds; every write it makes is a transaction whose first element checks
//! the fence item against its token. A deposed holder's write that arrives late (a
//! stalled process, a request held up in the network) is then refused by DynamoDB itself,
//! whatever the clocks say. Transactions cost two write units per item and run one at a
//! time (they all check the same item).

use crate::{s, DynamoSink, Error, Item, WriteFailure, SOURCE};
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::types::{ConditionCheck, Delete, Put, TransactWriteItem, Update, WriteRequest};
use std::time::Instant;
use toolrank_dynamodb::TOTAL;

/// Items per transaction besides the fence check (the API takes 100).
const ITEMS_PER_TRANSACTION: usize = 99;

/// The token this sink's writes carry, and whether it was claimed on the fence item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fence {
    pub token: u64,
    pub claimed: bool,
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Records `token` on the fence item unless a larger one is there: from then on, writes
/// carrying a smaller token are refused.
pub(crate) async fn claim(sink: &DynamoSink, token: u64) -> Result<(), Error> {
    let (table, units) = (&sink.table, &sink.units);
    let claimed = sink
        .client
        .update_item()
        .table_name(table)
        .set_key(Some(sink.fence_key()))
        .update_expression("SET #g = :g, ScoredBy = :src")
        .condition_expression("attribute_not_exists(#g) OR #g <= :g")
        .expression_attribute_names("#g", "Generation")
        .expression_attribute_values(":g", n(token))
        .expression_attribute_values(":src", s(SOURCE))
        .return_consumed_capacity(TOTAL)
        .send()
        .await;
    match claimed {
        Ok(out) => {
            units.add(out.consumed_capacity());
            Ok(())
        }
        Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Err(Error::Fenced(refused(token))),
        Err(e) => Err(Error::Aws(format!("claiming the sink's fence in {table}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)))),
    }
}

/// Why a write carrying `token` was refused.
fn refused(token: u64) -> String {
    format!("the table was claimed by a writer with a newer fencing token than {token}")
}

/// An item write as a transaction element.
pub(crate) fn update(b: &aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder) -> TransactWriteItem {
    let i = b.as_input();
    let update = Update::builder()
        .set_table_name(i.get_table_name().clone())
        .set_key(i.get_key().clone())
        .set_update_expression(i.get_update_expression().clone())
        .set_condition_expression(i.get_condition_expression().clone())
        .set_expression_attribute_names(i.get_expression_attribute_names().clone())
        .set_expression_attribute_values(i.get_expression_attribute_values().clone())
        .build()
        .expect("an UpdateItem has a table, a key and an expression");
    TransactWriteItem::builder().update(update).build()
}

pub(crate) fn delete(table: &str, key: Item) -> TransactWriteItem {
    TransactWriteItem::builder().delete(Delete::builder().table_name(table).set_key(Some(key)).build().expect("a key")).build()
}

/// A batch write's put or delete as a transaction element.
pub(crate) fn from_batch(table: &str, w: WriteRequest) -> TransactWriteItem {
    match (w.put_request, w.delete_request) {
        (Some(put), _) => TransactWriteItem::builder().put(Put::builder().table_name(table).set_item(Some(put.item)).build().expect("an item")).build(),
        (None, Some(del)) => delete(table, del.key),
        (None, None) => unreachable!("a write request puts or deletes"),
    }
}

/// Sends `len` items in transactions checked against the sink's fence item holding at
/// most `token`, one at a time, starting none after `deadline`. The items are built as
/// their transaction is (a large round's items all at once would be tens of MB of fresh
/// memory). The outcome of each item, by position: `None` if it was not sent. Once the
/// fence refuses, nothing more is sent.
pub(crate) async fn send(
    sink: &DynamoSink,
    token: u64,
    items: impl Iterator<Item = TransactWriteItem>,
    len: usize,
    deadline: Option<Instant>,
) -> Vec<Option<Result<(), WriteFailure>>> {
    let (client, table, units, limiter) = (&sink.client, sink.table.as_str(), &sink.units, &sink.limiter);
    let key = sink.fence_key();
    let check = ConditionCheck::builder()
        .table_name(table)
        .set_key(Some(key))
        .condition_expression("attribute_not_exists(#g) OR #g <= :g")
        .expression_attribute_names("#g", "Generation")
        .expression_attribute_values(":g", n(token))
        .build()
        .expect("a key and a condition");
    let check = TransactWriteItem::builder().condition_check(check).build();
    let mut outcomes: Vec<Option<Result<(), WriteFailure>>> = (0..len).map(|_| None).collect();
    let mut items = items.enumerate().peekable();
    while items.peek().is_some() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let mut live: Vec<(usize, TransactWriteItem)> = items.by_ref().take(ITEMS_PER_TRANSACTION).collect();
        while !live.is_empty() {
            // Transactional writes cost two units per item.
            limiter.spend(2.0 * live.len() as f64).await;
            // Cloned: an item whose own condition failed leaves the rest to be sent again.
            let elements = std::iter::once(check.clone()).chain(live.iter().map(|(_, item)| item.clone())).collect();
            let sent = client.transact_write_items().set_transact_items(Some(elements)).return_consumed_capacity(TOTAL).send().await;
            let e = match sent {
                Ok(out) => {
                    units.add_all(out.consumed_capacity());
                    live.iter().for_each(|(i, _)| outcomes[*i] = Some(Ok(())));
                    break;
                }
                Err(e) => e,
            };
            let reasons: Vec<&str> = match e.as_service_error() {
                Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c)) => {
                    c.cancellation_reasons().iter().map(|r| r.code().unwrap_or("None")).collect()
                }
                _ => Vec::new(),
            };
            if reasons.first() == Some(&"ConditionalCheckFailed") {
                let refused = refused(token);
                outcomes.iter_mut().filter(|o| o.is_none()).for_each(|o| *o = Some(Err(WriteFailure::Fenced(refused.clone()))));
                return outcomes;
            }
            // Only items whose own condition failed (a live Agent item deleted meanwhile):
            // those are gone, the rest is sent again.
            let gone = |j: usize| reasons.get(j + 1) == Some(&"ConditionalCheckFailed");
            if (0..live.len()).any(gone) && reasons.iter().skip(1).all(|r| *r == "None" || *r == "ConditionalCheckFailed") {
                let mut j = 0;
                live.retain(|(i, _)| {
                    let keep = !gone(j);
                    if !keep {
                        outcomes[*i] = Some(Err(WriteFailure::ItemGone));
                    }
                    j += 1;
                    keep
                });
                continue;
            }
            let message = format!("{}: {}", e.code().unwrap_or("error"), aws_sdk_dynamodb::error::DisplayErrorContext(&e));
            live.iter().for_each(|(i, _)| outcomes[*i] = Some(Err(WriteFailure::Other(message.clone()))));
            break;
        }
    }
    outcomes
}
