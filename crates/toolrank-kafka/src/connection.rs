//! How toolrank reaches a Kafka cluster: the bootstrap servers, any librdkafka property
//! (TLS, SASL PLAIN / SCRAM / OAUTHBEARER, timeouts), and MSK IAM tokens. Every client
//! (consumer group, producers, admin, dead letters, replay and mirror readers) is built
//! from one [`Connection`], so a setting given once applies everywhere.

use crate::context::Context;
use crate::msk_iam::Tokens;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Kafka connection problem, naming the endpoint and the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kafka settings: {0}")]
    Settings(String),
    #[error("connecting to Kafka at {brokers}: {cause}")]
    Client { brokers: String, cause: String },
    #[error("connecting to Kafka at {brokers} ({protocol}): the brokers refused the connection: {cause}")]
    Refused { brokers: String, protocol: String, cause: String },
}

/// Where the brokers are and how to talk to them.
#[derive(Clone)]
pub struct Connection {
    pub brokers: String,
    /// librdkafka properties applied after toolrank's defaults, in order.
    properties: Vec<(String, String)>,
    tokens: Option<Arc<Tokens>>,
}

/// Property names whose values are secrets: never shown.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "sasl.oauthbearer.config", "ssl.key.pem", "ssl_key", "ssl.keystore"].iter().any(|s| key.contains(s))
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.properties.iter().map(|(k, v)| if is_secret(k) { format!("{k}=***") } else { format!("{k}={v}") }).collect();
        f.debug_struct("Connection").field("brokers", &self.brokers).field("properties", &shown).field("msk_iam", &self.tokens.is_some()).finish()
    }
}

/// Parses one `KEY=VALUE` librdkafka property (kcat's `-X` form).
pub fn property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE (a librdkafka property such as security.protocol=SSL), not {:?}", s.split('=').next().unwrap_or(""))),
    }
}

/// Reads a properties file: `key=value` lines; blank lines and lines starting with `#`
/// or `!` are skipped. An error names the file and line, never a value.
pub fn read_properties(path: &Path) -> Result<Vec<(String, String)>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Settings(format!("reading {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| Error::Settings(format!("{}:{}: expected key=value", path.display(), n + 1)))?;
        out.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

/// A client error's text without the property value it may quote (a mistyped key can
/// carry a password).
fn without_values(e: rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description,
        other => other.to_string(),
    }
}

impl Connection {
    /// Plaintext to `brokers` (`host:port,...`) with librdkafka's defaults.
    pub fn plain(brokers: &str) -> Connection {
        Connection { brokers: brokers.to_owned(), properties: Vec::new(), tokens: None }
    }

    /// Adds librdkafka properties, applied after the defaults and earlier properties.
    pub fn with_properties(mut self, properties: impl IntoIterator<Item = (String, String)>) -> Connection {
        self.properties.extend(properties);
        self
    }

    /// Authenticates with MSK IAM: SASL_SSL with OAUTHBEARER tokens signed from the AWS
    /// credential chain (explicit `security.protocol` or `sasl.mechanism` properties win).
    pub fn with_msk_iam(mut self, tokens: Tokens) -> Connection {
        let defaults = [("security.protocol", "SASL_SSL"), ("sasl.mechanism", "OAUTHBEARER")];
        let given: Vec<(String, String)> = std::mem::take(&mut self.properties);
        self.properties = defaults.iter().filter(|(k, _)| !given.iter().any(|(g, _)| g == k)).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.properties.extend(given);
        self.tokens = Some(Arc::new(tokens));
        self
    }

    /// The value a property will have, if it was given.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The security protocol in use, for messages.
    pub fn protocol(&self) -> String {
        let mut p = self.property("security.protocol").unwrap_or("plaintext").to_ascii_uppercase();
        if let Some(m) = self.property("sasl.mechanism") {
            p = format!("{p}, {m}");
        }
        p
    }

    /// Client settings: toolrank's defaults, then the given properties.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_over(&[])
    }

    /// [`client_config`](Self::client_config) with `defaults` under the user's
    /// properties: what a client picks for itself (a consumer group's timeouts) unless
    /// the user set it (`--kafka-config max.poll.interval.ms=...`).
    pub fn client_config_over(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers).set("socket.keepalive.enable", "true");
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The context a client of this connection carries (token source, refusal record).
    pub fn context(&self) -> Context {
        Context::new(self.tokens.clone())
    }

    /// Connects once and fails fast when the settings cannot work: an unknown property, a
    /// TLS handshake that fails (wrong CA, TLS to a plaintext port), plaintext to a TLS
    /// port, a refused login. Brokers that do not answer within `wait` are an outage,
    /// not a settings error: that is logged and the caller goes on (its clients retry).
    pub fn verify(&self, wait: Duration) -> Result<(), Error> {
        let context = self.context();
        let probe: BaseProducer<Context> = self
            .client_config()
            // A TLS client talking to a plaintext port waits for a handshake that never
            // comes: give up on it within the wait.
            .set("socket.connection.setup.timeout.ms", (wait.as_millis() / 2).clamp(1000, 30_000).to_string())
            // Connection failures are logged at info level, and name their cause.
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Info)
            .create_with_context(context.clone())
            .map_err(|e| Error::Client { brokers: self.brokers.clone(), cause: without_values(e) })?;
        let deadline = Instant::now() + wait;
        loop {
            // Serves error events and the first OAUTHBEARER token request.
            probe.poll(Duration::from_millis(100));
            if let Some(cause) = context.refused() {
                return Err(Error::Refused { brokers: self.brokers.clone(), protocol: self.protocol(), cause });
            }
            match probe.client().fetch_metadata(None, Duration::from_millis(400)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(brokers = %self.brokers, error = %e, "Kafka brokers do not answer yet; going on, the clients retry");
                    return Ok(());
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_come_from_flags_and_files() {
        assert_eq!(property("security.protocol=SSL"), Ok(("security.protocol".into(), "SSL".into())));
        assert_eq!(property("sasl.jaas=a=b"), Ok(("sasl.jaas".into(), "a=b".into())));
        assert!(property("novalue").is_err());
        assert!(property("=x").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.properties");
        std::fs::write(&path, "# TLS\nsecurity.protocol = SASL_SSL\n\n! comment\nsasl.password=s3cret=x\n").unwrap();
        assert_eq!(read_properties(&path).unwrap(), vec![("security.protocol".into(), "SASL_SSL".into()), ("sasl.password".into(), "s3cret=x".into())]);
        std::fs::write(&path, "ok=1\nsasl.password s3cret\n").unwrap();
        let err = read_properties(&path).unwrap_err().to_string();
        assert!(err.ends_with("client.properties:2: expected key=value"), "{err}");
        assert!(!err.contains("s3cret"));
    }

    #[test]
    fn msk_iam_defaults_give_way_to_explicit_properties_and_secrets_stay_hidden() {
        let creds = aws_credential_types::Credentials::new("AKID", "SECRET", None, None, "test");
        let tokens =
            || Tokens::with_provider("us-east-1", aws_credential_types::provider::SharedCredentialsProvider::new(creds.clone()), Duration::from_secs(60));
        let c = Connection::plain("b:9098").with_msk_iam(tokens());
        assert_eq!(c.protocol(), "SASL_SSL, OAUTHBEARER");
        let c = Connection::plain("b:9098").with_properties([("security.protocol".into(), "sasl_plaintext".into())]).with_msk_iam(tokens());
        assert_eq!(c.property("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.property("sasl.mechanism"), Some("OAUTHBEARER"));
        let c = Connection::plain("b:9096").with_properties([("sasl.username".into(), "u".into()), ("sasl.password".into(), "hunter2".into())]);
        let shown = format!("{c:?}");
        assert!(shown.contains("sasl.username=u") && shown.contains("sasl.password=***") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn an_unknown_property_is_refused_before_connecting() {
        let c = Connection::plain("127.0.0.1:1").with_properties([("sasl.pasword".into(), "hunter2".into())]);
        let err = c.verify(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:1") && err.contains("sasl.pasword"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    /// librdkafka asks for a token when the client starts and again 80% through each
    /// token's remaining life (checked on a 1 s timer): every token is replaced before it
    /// expires, and not much sooner.
    #[test]
    fn msk_iam_tokens_are_refreshed_before_they_expire() {
        let creds = aws_credential_types::Credentials::new("AKID", "SECRET", None, None, "test");
        let lifetime = Duration::from_secs(8);
        let tokens = Tokens::with_provider("us-east-1", aws_credential_types::provider::SharedCredentialsProvider::new(creds), lifetime);
        let c = Connection::plain("127.0.0.1:1").with_properties([("security.protocol".into(), "SASL_PLAINTEXT".into())]).with_msk_iam(tokens);
        let counting = Counting { inner: c.context(), issued: Default::default() };
        let issued = counting.issued.clone();
        let client: BaseProducer<Counting> = c.client_config().create_with_context(counting).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(8500) && issued.lock().unwrap().len() < 2 {
            client.poll(Duration::from_millis(50));
        }
        let issued = issued.lock().unwrap().clone();
        assert_eq!(issued.len(), 2, "a second token within 8.5 s: {issued:?}");
        let ((asked0, expires0), (asked1, _)) = (issued[0], issued[1]);
        assert!(asked1 < expires0 - 300, "replaced before it expired: {issued:?}");
        assert!(asked1 - asked0 > 4000, "not long before: {issued:?}");
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
    }

    /// The context, noting when each token was asked for and when it expires.
    struct Counting {
        inner: Context,
        issued: Arc<std::sync::Mutex<Vec<(i64, i64)>>>,
    }

    impl rdkafka::ClientContext for Counting {
        const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;
        fn generate_oauth_token(&self, config: Option<&str>) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
            let asked = now_ms();
            let token = self.inner.generate_oauth_token(config)?;
            self.issued.lock().unwrap().push((asked, token.lifetime_ms));
            Ok(token)
        }
    }

    impl rdkafka::producer::ProducerContext for Counting {
        type DeliveryOpaque = ();
        fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
    }
}
