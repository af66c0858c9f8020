//! The normalized form every wire format is decoded into: a change to one `AgentTable`
//! item, already validated, so the engine never sees malformed data.

use crate::time::Timestamp;
use std::borrow::Cow;

/// The hist entity that records one tool execution.
pub const HIST_ENTITY: &str = "UserSessPrcToolMappHist";
/// The entity that carries an agent's domain and name.
pub const AGENT_ENTITY: &str = "Agent";
/// Sort key of metadata items (Domain, Agent, UserInfo).
pub const METADATA_SK: &str = "METADATA";

/// The sequence number of a backfilled item: a copy of the table's state at some moment
/// before now, older than any change the stream or topic carries.
pub const BASE_SEQ: u128 = 0;

/// A change to one item, identified by its primary key.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'a> {
    pub pk: Cow<'a, str>,
    pub sk: Cow<'a, str>,
    /// The DynamoDB Streams sequence number, when the source has one. A change whose
    /// sequence number is not above the last applied one for the same key is stale.
    /// [`BASE_SEQ`] marks a snapshot copy (a backfill): it applies only to keys the
    /// consumer holds nothing for, so it never undoes a change that reached it otherwise.
    pub seq: Option<u128>,
    pub action: Action<'a>,
}

/// What happens to the item.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<'a> {
    /// The item now has this content (insert, modify, export line, flat upsert).
    Put(Entity<'a>),
    /// The item is gone; `ttl` marks removals by DynamoDB's TTL process.
    Delete { ttl: bool },
}

/// The parts of an item the computation depends on.
#[derive(Debug, Clone, PartialEq)]
pub enum Entity<'a> {
    /// A `UserSessPrcToolMappHist` item: one tool execution. Its key parts are in the
    /// change's key (see [`HistKey`]).
    Execution(Execution<'a>),
    /// An `Agent` METADATA item.
    Agent(AgentItem<'a>),
    /// Any other entity type: it replaces whatever the key held, and is otherwise ignored.
    Other,
}

/// The staging-relevant attributes of a tool execution.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution<'a> {
    /// `ToolNM`.
    pub tool_nm: Cow<'a, str>,
    /// `TransactDT`.
    pub at: Timestamp,
    /// `SuccYN = 'Y'`.
    pub success: bool,
}

/// An Agent item as far as the rankings need it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentItem<'a> {
    /// `GSI1_PK`: the agent's domain.
    pub domain_id: Cow<'a, str>,
    /// `AgentNM`.
    pub name: Option<Cow<'a, str>>,
    /// A flat event only upserts domain and name: a missing name keeps the known one,
    /// where a whole item replaces it.
    pub partial: bool,
}

/// The five identifiers packed into a hist item's key:
/// `PK = user#session`, `SK = process#agent#tool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistKey<'a> {
    pub user: &'a str,
    pub session: &'a str,
    pub process: &'a str,
    pub agent: &'a str,
    pub tool: &'a str,
}

impl<'a> HistKey<'a> {
    /// Splits a hist item's key, requiring exactly two non-empty PK parts and three
    /// non-empty SK parts.
    pub fn parse(pk: &'a str, sk: &'a str) -> Result<HistKey<'a>, KeyError> {
        let (user, session) = split2(pk).ok_or(KeyError::Pk)?;
        let (process, rest) = sk.split_once('#').ok_or(KeyError::Sk)?;
        let (agent, tool) = split2(rest).ok_or(KeyError::Sk)?;
        if process.is_empty() {
            return Err(KeyError::Sk);
        }
        Ok(HistKey { user, session, process, agent, tool })
    }
}

fn split2(s: &str) -> Option<(&str, &str)> {
    let (a, b) = s.split_once('#')?;
    (!a.is_empty() && !b.is_empty() && !b.contains('#')).then_some((a, b))
}

/// Which part of a hist key is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("PK is not USER#SESSION")]
    Pk,
    #[error("SK is not PROCESS#AGENT#TOOL")]
    Sk,
}

impl Change<'_> {
    /// Detaches the change from the input buffer, so that decoding and applying can run
    /// on different threads.
    pub fn into_owned(self) -> Change<'static> {
        let action = match self.action {
            Action::Delete { ttl } => Action::Delete { ttl },
            Action::Put(Entity::Other) => Action::Put(Entity::Other),
            Action::Put(Entity::Execution(e)) => {
                Action::Put(Entity::Execution(Execution { tool_nm: Cow::Owned(e.tool_nm.into_owned()), at: e.at, success: e.success }))
            }
            Action::Put(Entity::Agent(a)) => Action::Put(Entity::Agent(AgentItem {
                domain_id: Cow::Owned(a.domain_id.into_owned()),
                name: a.name.map(|n| Cow::Owned(n.into_owned())),
                partial: a.partial,
            })),
        };
        Change { pk: Cow::Owned(self.pk.into_owned()), sk: Cow::Owned(self.sk.into_owned()), seq: self.seq, action }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_keys_need_exact_parts() {
        let k = HistKey::parse("USR001#SESS1", "PRC001#AGT001#TL001").unwrap();
        assert_eq!((k.user, k.session, k.process, k.agent, k.tool), ("USR001", "SESS1", "PRC001", "AGT001", "TL001"));
        assert_eq!(HistKey::parse("USR001", "PRC001#AGT001#TL001"), Err(KeyError::Pk));
        assert_eq!(HistKey::parse("U#S#X", "P#A#T"), Err(KeyError::Pk));
        for sk in ["PRC001#AGT001", "PRC001", "P#A#T#X", "#A#T", "P##T", "P#A#"] {
            assert_eq!(HistKey::parse("U#S", sk), Err(KeyError::Sk), "{sk}");
        }
    }
}
