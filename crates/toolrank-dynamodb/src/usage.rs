//! What a client's DynamoDB requests cost, by operation: requests and read capacity
//! units, for the metrics (`toolrank_dynamodb_requests_total{op}`,
//! `toolrank_dynamodb_read_units_total{op}`) and for whoever holds the [`Usage`].
//!
//! An interceptor on the client sees every request, the SDK's retries included, so no
//! call site can forget to count. Reads are sent with `ReturnConsumedCapacity=TOTAL`
//! (free, and the only way to know what a read cost).

use aws_sdk_dynamodb::config::interceptors::{BeforeSerializationInterceptorContextMut, FinalizerInterceptorContextRef};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::operation::batch_get_item::{BatchGetItemInput, BatchGetItemOutput};
use aws_sdk_dynamodb::operation::get_item::{GetItemInput, GetItemOutput};
use aws_sdk_dynamodb::operation::query::{QueryInput, QueryOutput};
use aws_sdk_dynamodb::operation::scan::{ScanInput, ScanOutput};
use aws_sdk_dynamodb::types::{ConsumedCapacity, ReturnConsumedCapacity};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Requests and read units by operation name (`Query`, `PutItem`, ...), shared by a
/// client's interceptor and whoever asked for it ([`crate::client_with_usage`]).
#[derive(Clone, Debug, Default)]
pub struct Usage {
    by_op: Arc<Mutex<BTreeMap<String, Cost>>>,
}

/// The cost of one operation so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub requests: u64,
    pub read_units: f64,
}

impl Usage {
    /// The cost so far, by operation.
    pub fn by_op(&self) -> BTreeMap<String, Cost> {
        self.by_op.lock().expect("usage lock").clone()
    }

    /// The read units of every operation so far.
    pub fn read_units(&self) -> f64 {
        self.by_op.lock().expect("usage lock").values().map(|c| c.read_units).sum()
    }

    fn add(&self, op: &str, read_units: f64) {
        let mut by_op = self.by_op.lock().expect("usage lock");
        let cost = by_op.entry(op.to_owned()).or_default();
        cost.requests += 1;
        // Whole units in the metrics (counters count): each client adds what its running
        // total's whole part grew by, so several clients' figures add up.
        let before = cost.read_units.round() as u64;
        cost.read_units += read_units;
        metrics::counter!("toolrank_dynamodb_requests_total", "op" => op.to_owned()).increment(1);
        metrics::counter!("toolrank_dynamodb_read_units_total", "op" => op.to_owned()).increment(cost.read_units.round() as u64 - before);
    }
}

/// The interceptor that fills a [`Usage`].
#[derive(Debug)]
pub(crate) struct Counting(pub(crate) Usage);

impl Intercept for Counting {
    fn name(&self) -> &'static str {
        "toolrank-usage"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = context.input_mut();
        if let Some(i) = input.downcast_mut::<QueryInput>() {
            i.return_consumed_capacity.get_or_insert(ReturnConsumedCapacity::Total);
        } else if let Some(i) = input.downcast_mut::<ScanInput>() {
            i.return_consumed_capacity.get_or_insert(ReturnConsumedCapacity::Total);
        } else if let Some(i) = input.downcast_mut::<GetItemInput>() {
            i.return_consumed_capacity.get_or_insert(ReturnConsumedCapacity::Total);
        } else if let Some(i) = input.downcast_mut::<BatchGetItemInput>() {
            i.return_consumed_capacity.get_or_insert(ReturnConsumedCapacity::Total);
        }
        Ok(())
    }

    fn read_after_execution(&self, context: &FinalizerInterceptorContextRef<'_>, _components: &RuntimeComponents, cfg: &mut ConfigBag) -> Result<(), BoxError> {
        let op = cfg.load::<Metadata>().map_or("unknown", Metadata::name);
        let units = match context.output_or_error() {
            Some(Ok(output)) => read_units(output),
            _ => 0.0,
        };
        self.0.add(op, units);
        Ok(())
    }
}

/// The read units a read's output reports (none for writes: their units are counted
/// where they are written, as the sinks' and the state's write units).
fn read_units(output: &aws_smithy_runtime_api::client::interceptors::context::Output) -> f64 {
    let units = |c: Option<&ConsumedCapacity>| c.and_then(ConsumedCapacity::capacity_units).unwrap_or(0.0);
    if let Some(o) = output.downcast_ref::<QueryOutput>() {
        units(o.consumed_capacity())
    } else if let Some(o) = output.downcast_ref::<ScanOutput>() {
        units(o.consumed_capacity())
    } else if let Some(o) = output.downcast_ref::<GetItemOutput>() {
        units(o.consumed_capacity())
    } else if let Some(o) = output.downcast_ref::<BatchGetItemOutput>() {
        o.consumed_capacity().iter().map(|c| units(Some(c))).sum()
    } else {
        0.0
    }
}
