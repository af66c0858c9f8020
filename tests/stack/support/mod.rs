//! What the real-server tests share.

mod process;
mod proxy;
mod runtime_api;
mod stack;

pub use process::*;
pub use proxy::*;
pub use runtime_api::*;
pub use stack::*;
