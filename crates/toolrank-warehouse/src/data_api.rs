//! A Redshift Data API client: submit, poll until done (cancelling on timeout), page
//! through results.
//!
//! The Data API is asynchronous: ExecuteStatement and BatchExecuteStatement return an id
//! at once, DescribeStatement says when it finished, GetStatementResult pages the rows.
//! Transient HTTP failures are retried by the SDK; a statement's own failure is not
//! retried, because the SQL or the data needs fixing.

use crate::Error;
use aws_sdk_redshiftdata::error::{DisplayErrorContext, SdkError};
use aws_sdk_redshiftdata::types::{Field, SqlParameter, StatusString};
use aws_sdk_redshiftdata::Client;
use std::time::{Duration, Instant};

/// Which warehouse the statements run on, and how the caller authenticates.
#[derive(Clone, Debug)]
pub enum Target {
    /// A provisioned cluster with temporary credentials for a database user.
    Cluster { id: String, db_user: Option<String>, secret_arn: Option<String> },
    /// A Redshift Serverless workgroup (the user is derived from the IAM identity).
    Workgroup { name: String, secret_arn: Option<String> },
}

/// A connected Data API client for one database.
pub struct DataApi {
    client: Client,
    target: Target,
    database: String,
    timeout: Duration,
}

/// One column value of a result.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Long(i64),
    Double(f64),
    Text(String),
}

/// A statement's result: column names and all rows (every page).
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    /// The position of column `name`.
    pub fn column(&self, name: &str) -> Result<usize, Error> {
        self.columns.iter().position(|c| c.eq_ignore_ascii_case(name)).ok_or_else(|| Error::Shape(format!("no column {name} in {:?}", self.columns)))
    }
}

fn api<E: std::error::Error + 'static, R: std::fmt::Debug>(call: &'static str) -> impl FnOnce(SdkError<E, R>) -> Error {
    move |e| Error::Api { call, message: DisplayErrorContext(&e).to_string() }
}

macro_rules! targeted {
    ($builder:expr, $self:ident) => {{
        let b = $builder.database(&$self.database);
        match &$self.target {
            Target::Cluster { id, db_user, secret_arn } => b.cluster_identifier(id).set_db_user(db_user.clone()).set_secret_arn(secret_arn.clone()),
            Target::Workgroup { name, secret_arn } => b.workgroup_name(name).set_secret_arn(secret_arn.clone()),
        }
    }};
}

impl DataApi {
    /// A client from the environment's AWS configuration (`AWS_ENDPOINT_URL_REDSHIFT_DATA`
    /// points it at a local endpoint). `timeout` bounds each statement.
    pub async fn connect(target: Target, database: &str, timeout: Duration) -> DataApi {
        let config = toolrank_dynamodb::sdk_config().await;
        DataApi { client: Client::new(&config), target, database: database.to_owned(), timeout }
    }

    /// Runs `sqls` as one transaction (BatchExecuteStatement) and waits for it.
    pub async fn batch(&self, sqls: Vec<String>) -> Result<(), Error> {
        let text = sqls.join(";\n");
        let out = targeted!(self.client.batch_execute_statement().set_sqls(Some(sqls)), self).send().await.map_err(api("BatchExecuteStatement"))?;
        self.wait(statement_id(out.id())?, &text).await.map(|_| ())
    }

    /// Runs one statement with named parameters (`:name`) and returns its rows, all pages.
    pub async fn query(&self, sql: &str, params: &[(&str, &str)]) -> Result<Rows, Error> {
        let params = params
            .iter()
            .map(|(n, v)| SqlParameter::builder().name(*n).value(*v).build().map_err(|e| Error::Shape(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let params = (!params.is_empty()).then_some(params);
        let out = targeted!(self.client.execute_statement().sql(sql).set_parameters(params), self).send().await.map_err(api("ExecuteStatement"))?;
        let id = statement_id(out.id())?;
        if !self.wait(id, sql).await? {
            return Ok(Rows::default());
        }
        self.fetch(id).await
    }

    /// Polls until the statement ends; `Ok(has_result_set)` when it finished. Cancels it
    /// when the timeout passes.
    async fn wait(&self, id: &str, sql: &str) -> Result<bool, Error> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let d = self.client.describe_statement().id(id).send().await.map_err(api("DescribeStatement"))?;
            let message = || d.error().unwrap_or_default().to_owned();
            match d.status() {
                Some(StatusString::Finished) => return Ok(d.has_result_set().unwrap_or(false)),
                Some(StatusString::Failed) => {
                    // A batch names the sub-statement that failed.
                    let failed = d.sub_statements().iter().find(|s| s.error().is_some()).and_then(|s| s.query_string());
                    return Err(Error::Failed { message: message(), statement: crate::statement_name(failed.unwrap_or(sql)) });
                }
                Some(StatusString::Aborted) => return Err(Error::Aborted { id: id.to_owned(), message: message() }),
                _ => {}
            }
            if started.elapsed() >= self.timeout {
                if let Err(e) = self.client.cancel_statement().id(id).send().await {
                    tracing::warn!(id, error = %DisplayErrorContext(&e), "cancelling a timed-out statement failed");
                }
                return Err(Error::Timeout { id: id.to_owned(), secs: self.timeout.as_secs() });
            }
            tokio::time::sleep(pause.min(self.timeout.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn fetch(&self, id: &str) -> Result<Rows, Error> {
        let mut out = Rows::default();
        let mut token = None;
        loop {
            let page = self.client.get_statement_result().id(id).set_next_token(token).send().await.map_err(api("GetStatementResult"))?;
            if out.columns.is_empty() {
                out.columns = page.column_metadata().iter().map(|c| c.name().unwrap_or_default().to_owned()).collect();
            }
            for record in page.records() {
                out.rows.push(record.iter().map(value).collect::<Result<_, _>>()?);
            }
            token = page.next_token;
            if token.is_none() {
                return Ok(out);
            }
        }
    }
}

fn statement_id(id: Option<&str>) -> Result<&str, Error> {
    id.ok_or_else(|| Error::Shape("the Data API returned no statement id".into()))
}

fn value(f: &Field) -> Result<Value, Error> {
    Ok(match f {
        Field::IsNull(true) => Value::Null,
        Field::BooleanValue(b) => Value::Bool(*b),
        Field::LongValue(v) => Value::Long(*v),
        Field::DoubleValue(v) => Value::Double(*v),
        Field::StringValue(s) => Value::Text(s.clone()),
        other => return Err(Error::Shape(format!("unsupported field {other:?}"))),
    })
}
