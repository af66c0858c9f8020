//! The Kafka connection flags every command that reads or writes a topic shares.

use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::time::Duration;
use toolrank_kafka::Connection;

/// How long a command waits at start for the brokers to accept its settings.
const VERIFY_WAIT: Duration = Duration::from_secs(10);

/// No Debug: --kafka-config values may be secrets.
#[derive(clap::Args, Clone)]
pub struct ConnectionArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOOLRANK_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// A librdkafka property for every Kafka client, as kcat's -X (repeatable), applied
    /// after toolrank's defaults and the properties file: security.protocol=SSL,
    /// ssl.ca.location=ca.pem, sasl.mechanism=SCRAM-SHA-512, sasl.username=NAME, ...
    /// Keep passwords in the properties file, not on a command line others can list.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = toolrank_kafka::property)]
    pub kafka_config: Vec<(String, String)>,
    /// A file of librdkafka properties (key=value lines, # comments), applied before
    /// --kafka-config: the place for sasl.password and other secrets.
    #[arg(long, env = "TOOLRANK_KAFKA_CONFIG_FILE", value_name = "FILE")]
    pub kafka_config_file: Option<PathBuf>,
    /// How clients authenticate beyond what the properties say. msk-iam: Amazon MSK IAM,
    /// SASL_SSL with OAUTHBEARER tokens signed from the AWS credential chain (region from
    /// AWS_REGION or the profile), refreshed before they expire.
    #[arg(long, value_enum, env = "TOOLRANK_KAFKA_AUTH", default_value = "properties")]
    pub kafka_auth: KafkaAuth,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaAuth {
    /// Whatever the properties set (plaintext when they set nothing).
    Properties,
    /// Amazon MSK IAM access control.
    MskIam,
}

impl ConnectionArgs {
    /// The connection these flags describe, checked against the brokers: settings they
    /// refuse (TLS, login, an unknown property) end the command here with the cause.
    pub fn connect(&self) -> Result<Connection> {
        let connection = self.connection()?;
        connection.verify(VERIFY_WAIT)?;
        Ok(connection)
    }

    fn connection(&self) -> Result<Connection> {
        let mut connection = Connection::plain(&self.brokers);
        if let Some(path) = &self.kafka_config_file {
            connection = connection.with_properties(toolrank_kafka::read_properties(path).context("TOOLRANK_KAFKA_CONFIG_FILE")?);
        }
        connection = connection.with_properties(self.kafka_config.iter().cloned());
        if self.kafka_auth == KafkaAuth::MskIam {
            connection = connection.with_msk_iam(toolrank_kafka::msk_iam::Tokens::from_environment());
        }
        Ok(connection)
    }
}
