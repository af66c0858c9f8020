//! Against the real local stack (`infra/local/up`): Kafka (tansu) and DynamoDB Local.
//! Built with `--features local-stack`; `scripts/test` starts the stack and enables it.
//! One module per path; `support` holds the processes, the stack, the fault proxy and the
//! Lambda Runtime API they share. Run one path with e.g. `cargo test --features local-stack
//! --test stack lambda::`.
#![cfg(feature = "local-stack")]

mod support;

mod backfill;
mod cluster;
mod kafka;
mod lambda;
mod sinks;
mod state;
mod streams;
mod tls;
mod warehouse;
