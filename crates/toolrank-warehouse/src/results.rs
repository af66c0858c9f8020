//! The warehouse's analysis tables read back as a [`Report`], the type every other path
//! (replay, the sinks) produces, so they can be written and compared the same way.

use crate::{DataApi, Error, Rows, Value};
use toolrank_engine::{AgentScore, PatternRow, Report, ToolErrors};
use toolrank_events::{Day, Timestamp};

/// Reads the three analysis tables.
pub async fn read(api: &DataApi) -> Result<Report, Error> {
    let agents = api.query("SELECT * FROM agent_score_summary ORDER BY calculated_score DESC, domainid, agentid", &[]).await?;
    let patterns =
        api.query("SELECT * FROM user_process_patterns ORDER BY pattern_score DESC, userid, process_pattern, agent_sequence, tool_sequence", &[]).await?;
    let errors = api.query("SELECT * FROM agent_tool_errors ORDER BY error_rate DESC, total_errors DESC, agentid", &[]).await?;
    Ok(Report { agents: agent_rows(&agents)?, patterns: pattern_rows(&patterns)?, tool_errors: error_rows(&errors)? })
}

/// One row of the warehouse's staging table (owned: it comes off the wire).
#[derive(Clone, Debug, PartialEq)]
pub struct Staging {
    pub user_id: String,
    pub session_id: String,
    pub process_id: String,
    pub domain_id: String,
    pub agent_id: String,
    pub tool_id: String,
    pub tool_nm: String,
    pub at: Timestamp,
    pub success: bool,
}

/// Reads the staging table in `replay --out` order.
pub async fn staging(api: &DataApi) -> Result<Vec<Staging>, Error> {
    let rows = api
        .query(
            "SELECT userid, sessionid, processid, domainid, agentid, toolid, toolnm, execution_datetime, success_flag \
             FROM agent_tool_analysis_staging ORDER BY userid, sessionid, execution_datetime, processid, agentid, toolid",
            &[],
        )
        .await?;
    each(&rows, |r| {
        let at = r.string("execution_datetime")?;
        Ok(Staging {
            user_id: r.string("userid")?,
            session_id: r.string("sessionid")?,
            process_id: r.string("processid")?,
            domain_id: r.string("domainid")?,
            agent_id: r.string("agentid")?,
            tool_id: r.string("toolid")?,
            tool_nm: r.string("toolnm")?,
            at: timestamp(&at).ok_or_else(|| Error::Shape(format!("execution_datetime {at:?} is not YYYY-MM-DD HH:MM:SS")))?,
            success: r.bool("success_flag")?,
        })
    })
}

/// One Agent of the warehouse's catalog.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogEntry {
    pub agent_id: String,
    pub domain_id: String,
    pub agent_name: Option<String>,
}

/// Reads the agent catalog.
pub async fn catalog(api: &DataApi) -> Result<Vec<CatalogEntry>, Error> {
    let rows = api.query("SELECT agentid, domainid, agentnm FROM agent_catalog ORDER BY agentid", &[]).await?;
    each(&rows, |r| Ok(CatalogEntry { agent_id: r.string("agentid")?, domain_id: r.string("domainid")?, agent_name: r.text("agentnm")? }))
}

/// A timestamp as the warehouse prints it (`YYYY-MM-DD HH:MM:SS`), back to `TransactDT`.
fn timestamp(text: &str) -> Option<Timestamp> {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    Timestamp::parse(&digits)
}

/// Typed access to one row by column name.
struct Row<'a> {
    rows: &'a Rows,
    values: &'a [Value],
}

impl Row<'_> {
    fn get(&self, name: &str) -> Result<&Value, Error> {
        Ok(&self.values[self.rows.column(name)?])
    }
    fn text(&self, name: &str) -> Result<Option<String>, Error> {
        match self.get(name)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            v => Err(Error::Shape(format!("{name}: expected text, got {v:?}"))),
        }
    }
    fn string(&self, name: &str) -> Result<String, Error> {
        self.text(name)?.ok_or_else(|| Error::Shape(format!("{name} is NULL")))
    }
    fn count(&self, name: &str) -> Result<u64, Error> {
        match self.get(name)? {
            Value::Long(v) if *v >= 0 => Ok(*v as u64),
            v => Err(Error::Shape(format!("{name}: expected a count, got {v:?}"))),
        }
    }
    fn long(&self, name: &str) -> Result<i64, Error> {
        match self.get(name)? {
            Value::Long(v) => Ok(*v),
            v => Err(Error::Shape(format!("{name}: expected an integer, got {v:?}"))),
        }
    }
    fn double(&self, name: &str) -> Result<f64, Error> {
        match self.get(name)? {
            Value::Double(v) => Ok(*v),
            Value::Long(v) => Ok(*v as f64),
            v => Err(Error::Shape(format!("{name}: expected a number, got {v:?}"))),
        }
    }
    fn bool(&self, name: &str) -> Result<bool, Error> {
        match self.get(name)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Error::Shape(format!("{name}: expected a boolean, got {v:?}"))),
        }
    }
    fn day(&self, name: &str) -> Result<Day, Error> {
        let text = self.string(name)?;
        Day::parse_iso(&text).ok_or_else(|| Error::Shape(format!("{name}: {text:?} is not a YYYY-MM-DD date")))
    }
}

fn each<T>(rows: &Rows, f: impl Fn(&Row) -> Result<T, Error>) -> Result<Vec<T>, Error> {
    rows.rows.iter().map(|values| f(&Row { rows, values })).collect()
}

fn agent_rows(rows: &Rows) -> Result<Vec<AgentScore>, Error> {
    each(rows, |r| {
        Ok(AgentScore {
            domain_id: r.string("domainid")?,
            agent_id: r.string("agentid")?,
            agent_name: r.text("agentnm")?,
            total_executions: r.count("total_executions")?,
            success_count: r.count("success_count")?,
            failure_count: r.count("failure_count")?,
            success_rate: r.double("success_rate")?,
            last_execution_date: r.day("last_execution_date")?,
            days_since_last_exec: r.long("days_since_last_exec")?,
            time_decay_factor: r.double("time_decay_factor")?,
            calculated_score: r.double("calculated_score")?,
        })
    })
}

fn pattern_rows(rows: &Rows) -> Result<Vec<PatternRow>, Error> {
    each(rows, |r| {
        Ok(PatternRow {
            user_id: r.string("userid")?,
            process_pattern: r.string("process_pattern")?,
            agent_sequence: r.string("agent_sequence")?,
            tool_sequence: r.string("tool_sequence")?,
            execution_count: r.count("execution_count")?,
            success_count: r.count("success_count")?,
            first_used_date: r.day("first_used_date")?,
            last_used_date: r.day("last_used_date")?,
            pattern_score: r.double("pattern_score")?,
            is_recommended: r.bool("is_recommended")?,
        })
    })
}

fn error_rows(rows: &Rows) -> Result<Vec<ToolErrors>, Error> {
    each(rows, |r| {
        Ok(ToolErrors {
            agent_id: r.string("agentid")?,
            agent_name: r.text("agent_name")?,
            total_executions: r.count("total_executions")?,
            total_errors: r.count("total_errors")?,
            error_rate: r.double("error_rate")?,
            failed_tools: r.string("failed_tools")?,
        })
    })
}
