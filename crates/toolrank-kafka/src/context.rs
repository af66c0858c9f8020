//! The client context every toolrank Kafka client carries: it answers librdkafka's
//! OAUTHBEARER token requests (MSK IAM) and remembers errors that retrying cannot fix (a
//! TLS handshake or a login the broker refused), so a client that cannot get in says why.

use crate::msk_iam::Tokens;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Context {
    tokens: Option<Arc<Tokens>>,
    refused: Arc<Mutex<Option<String>>>,
    /// Connections the broker dropped at the first request (`APIVERSION_QUERY`).
    hung_up: Arc<AtomicU32>,
}

impl Context {
    pub(crate) fn new(tokens: Option<Arc<Tokens>>) -> Context {
        Context { tokens, ..Context::default() }
    }

    /// The last error that says the brokers refuse this client's connection settings.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refuse(&self, cause: String) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(cause);
    }

    /// Notes a librdkafka message that shows the settings cannot work: a TLS handshake
    /// that failed or got no answer (a wrong CA, TLS to a plaintext port), a refused
    /// login, or a broker that hangs up at every first request (plaintext to a TLS port).
    fn classify(&self, message: &str) {
        if message.contains("SSL handshake failed") {
            self.refuse(message.to_owned());
        } else if message.contains("in state SSL_HANDSHAKE") {
            self.refuse(format!("{message} (no TLS answer: is this a plaintext port?)"));
        } else if message.contains("Authentication failed") || message.contains("SASL authentication error") {
            self.refuse(message.to_owned());
        } else if hung_up_at_once(message) && self.hung_up.fetch_add(1, Ordering::Relaxed) >= 1 {
            self.refuse(format!("{message} (the broker hangs up at the first request: a TLS port needs security.protocol=SSL or SASL_SSL)"));
        }
    }
}

/// A TLS port answers a plaintext first request by closing the connection at once
/// (within milliseconds); a broker that is busy or going down may hang up on it too, but
/// only after seconds, and that is an outage, not a setting.
const HANG_UP_AT_ONCE_MS: u64 = 1000;

/// Whether `message` says the broker closed the connection at the first request
/// (`Disconnected: ... (after 5ms in state APIVERSION_QUERY)`), and did so at once.
fn hung_up_at_once(message: &str) -> bool {
    let Some(at) = message.find("ms in state APIVERSION_QUERY") else { return false };
    // The number just before it: what follows the last non-digit.
    let ms = message[..at].rsplit(|c: char| !c.is_ascii_digit()).next().unwrap_or("").parse::<u64>();
    message.contains("Disconnected") && ms.is_ok_and(|ms| ms < HANG_UP_AT_ONCE_MS)
}

/// Whether an error librdkafka reports means the connection settings are wrong (no retry
/// helps), as opposed to a broker that is down or busy.
fn is_refusal(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::Global(code) => Some(*code),
        _ => error.rdkafka_error_code(),
    };
    matches!(code, Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed))
}

impl ClientContext for Context {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn error(&self, error: KafkaError, reason: &str) {
        if is_refusal(&error) {
            self.refuse(reason.to_owned());
        }
        self.classify(reason);
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.classify(message);
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "{facility} {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{facility} {message}"),
            RDKafkaLogLevel::Notice => tracing::info!(target: "librdkafka", "{facility} {message}"),
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{facility} {message}"),
        }
    }

    fn generate_oauth_token(&self, _config: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        let Some(tokens) = &self.tokens else {
            return Err("sasl.mechanism=OAUTHBEARER needs a token source: --kafka-auth msk-iam".into());
        };
        let token = tokens.token().inspect_err(|e| tracing::warn!("{e}"))?;
        Ok(OAuthToken { token: token.value, principal_name: token.principal, lifetime_ms: token.expires_ms })
    }
}

impl Context {
    /// Sets a token on a client now: the admin client never polls librdkafka's main queue,
    /// where token requests arrive, and a consumer asks for metadata before its first poll.
    pub fn give_token<C: ClientContext>(&self, client: &rdkafka::client::Client<C>) -> Result<(), String> {
        if self.tokens.is_none() {
            return Ok(());
        }
        let token = self.generate_oauth_token(None).map_err(|e| e.to_string())?;
        let value = std::ffi::CString::new(token.token).map_err(|e| e.to_string())?;
        let principal = std::ffi::CString::new(token.principal_name).map_err(|e| e.to_string())?;
        let mut errstr = [0 as std::ffi::c_char; 512];
        // SAFETY: the client pointer is live for the borrow; librdkafka copies the strings.
        let code = unsafe {
            rdkafka::bindings::rd_kafka_oauthbearer_set_token(
                client.native_ptr(),
                value.as_ptr(),
                token.lifetime_ms,
                principal.as_ptr(),
                std::ptr::null_mut(),
                0,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if code == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Ok(())
        } else {
            // SAFETY: librdkafka writes a NUL-terminated message into the buffer.
            Err(unsafe { std::ffi::CStr::from_ptr(errstr.as_ptr()) }.to_string_lossy().into_owned())
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Context {}

impl rdkafka::producer::ProducerContext for Context {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Implements `ClientContext` for a context with a `kafka: Context` field (one that also
/// tracks rebalances or deliveries), handing token requests and errors to it.
#[macro_export]
macro_rules! delegate_client_context {
    ($t:ty) => {
        impl rdkafka::client::ClientContext for $t {
            const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;
            fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
                rdkafka::client::ClientContext::error(&self.kafka, error, reason)
            }
            fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
                rdkafka::client::ClientContext::log(&self.kafka, level, facility, message)
            }
            fn generate_oauth_token(&self, config: Option<&str>) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
                self.kafka.generate_oauth_token(config)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const TLS_PORT: &str = "127.0.0.1:19093/bootstrap: Disconnected: connection reset by peer (after 5ms in state APIVERSION_QUERY)";
    const GOING_DOWN: &str =
        "127.0.0.1:24483/111: Disconnected: connection reset by peer (after 4903ms in state APIVERSION_QUERY, 1 identical error(s) suppressed)";

    #[test]
    fn a_broker_hanging_up_at_once_twice_is_a_tls_port_and_one_hanging_up_late_an_outage() {
        let context = Context::default();
        context.classify(TLS_PORT);
        assert_eq!(context.refused(), None, "one hang-up may be chance");
        context.classify(TLS_PORT);
        assert!(context.refused().is_some_and(|cause| cause.contains("a TLS port needs security.protocol=SSL")));

        let context = Context::default();
        for _ in 0..5 {
            context.classify(GOING_DOWN);
        }
        assert_eq!(context.refused(), None);
        for message in ["Disconnected (after ms in state APIVERSION_QUERY)", "after 3ms in state APIVERSION_QUERY", "Disconnected: after 3ms in state UP"] {
            assert!(!hung_up_at_once(message), "{message}");
        }
    }
}
