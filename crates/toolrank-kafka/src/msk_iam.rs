//! Amazon MSK IAM authentication: SASL/OAUTHBEARER tokens signed from the AWS credential
//! chain, in the format AWS's published signers make (aws-msk-iam-sasl-signer-go,
//! -python, -js): the base64url (unpadded) text of a SigV4-presigned URL
//! `https://kafka.<region>.amazonaws.com/?Action=kafka-cluster:Connect&X-Amz-…` for the
//! signing name `kafka-cluster`, valid for 900 s, with a `User-Agent` parameter added
//! after signing. librdkafka asks for a new token 80% through the current one's life.

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use base64::Engine;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// How long a token lasts (the published signers' default).
pub const LIFETIME: Duration = Duration::from_secs(900);
/// How long one token request may take (the credential chain may call STS or IMDS).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const SIGNING_NAME: &str = "kafka-cluster";
const USER_AGENT: &str = concat!("toolrank/", env!("CARGO_PKG_VERSION"));

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MSK IAM authentication needs an AWS region: set AWS_REGION (or a profile's region)")]
    NoRegion,
    #[error("MSK IAM authentication: no AWS credentials: {0}")]
    Credentials(String),
    #[error("MSK IAM authentication: signing the token: {0}")]
    Signing(String),
    #[error("MSK IAM authentication: no token within {0:?}")]
    Timeout(Duration),
}

/// A signed token and when it expires.
#[derive(Debug, Clone)]
pub struct Token {
    /// What goes to the broker (never logged).
    pub value: String,
    /// Expiry in milliseconds since the Unix epoch, as librdkafka wants it.
    pub expires_ms: i64,
    /// The access key id that signed it (not secret; shown as the principal).
    pub principal: String,
}

/// Signs a token for `region` with `credentials` at `now`, valid for `lifetime`.
pub fn sign(region: &str, credentials: &Credentials, now: SystemTime, lifetime: Duration) -> Result<Token, Error> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings};
    let mut url = url::Url::parse(&format!("https://kafka.{region}.amazonaws.com/")).map_err(|e| Error::Signing(e.to_string()))?;
    url.query_pairs_mut().append_pair("Action", "kafka-cluster:Connect");
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(lifetime);
    let identity = credentials.clone().into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_NAME)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| Error::Signing(e.to_string()))?;
    let request = SignableRequest::new("GET", url.as_str(), std::iter::empty(), SignableBody::Bytes(&[])).map_err(|e| Error::Signing(e.to_string()))?;
    let (instructions, _) = sign(request, &params.into()).map_err(|e| Error::Signing(e.to_string()))?.into_parts();
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in instructions.params() {
            query.append_pair(name, value);
        }
        query.append_pair("User-Agent", USER_AGENT);
    }
    let signed_at = now.duration_since(SystemTime::UNIX_EPOCH).map_err(|e| Error::Signing(e.to_string()))?;
    // The broker counts the lifetime from X-Amz-Date, which has whole seconds.
    let expires_ms = ((signed_at.as_secs() + lifetime.as_secs()) * 1000) as i64;
    Ok(Token { value: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url.as_str()), expires_ms, principal: credentials.access_key_id().to_owned() })
}

/// Makes tokens on demand from the AWS credential chain, on a thread of its own: librdkafka
/// asks from inside a poll, which may run on an async runtime's thread, and the chain's
/// HTTP clients (STS, IMDS, ECS) keep connections bound to the runtime that made them.
#[derive(Debug)]
pub struct Tokens {
    requests: mpsc::Sender<mpsc::Sender<Result<Token, Error>>>,
}

impl Tokens {
    /// Tokens from the default credential chain and region (environment, profile, web
    /// identity, ECS or EC2 roles), as the AWS SDKs find them.
    pub fn from_environment() -> Tokens {
        Tokens::start(None, LIFETIME)
    }

    /// Tokens from `provider` for `region`, lasting `lifetime` (tests shorten it).
    pub fn with_provider(region: &str, provider: SharedCredentialsProvider, lifetime: Duration) -> Tokens {
        Tokens::start(Some((region.to_owned(), provider)), lifetime)
    }

    fn start(fixed: Option<(String, SharedCredentialsProvider)>, lifetime: Duration) -> Tokens {
        let (requests, incoming) = mpsc::channel::<mpsc::Sender<Result<Token, Error>>>();
        std::thread::Builder::new()
            .name("msk-iam-tokens".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                let mut source = fixed;
                // The thread ends when the last `Tokens` (the clients' contexts) is dropped.
                while let Ok(reply) = incoming.recv() {
                    let token = rt.block_on(async {
                        if source.is_none() {
                            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                            let region = sdk.region().map(|r| r.to_string()).ok_or(Error::NoRegion)?;
                            let provider = sdk.credentials_provider().ok_or_else(|| Error::Credentials("no credential provider".into()))?;
                            source = Some((region, provider));
                        }
                        let (region, provider) = source.as_ref().expect("set above");
                        let credentials = provider.provide_credentials().await.map_err(|e| Error::Credentials(e.to_string()))?;
                        sign(region, &credentials, SystemTime::now(), lifetime)
                    });
                    let _ = reply.send(token);
                }
            })
            .expect("spawning the MSK IAM token thread");
        Tokens { requests }
    }

    /// A fresh token, waiting for the credential chain at most [`REQUEST_TIMEOUT`].
    pub fn token(&self) -> Result<Token, Error> {
        let (reply, answer) = mpsc::channel();
        self.requests.send(reply).map_err(|_| Error::Credentials("the token thread stopped".into()))?;
        answer.recv_timeout(REQUEST_TIMEOUT).map_err(|_| Error::Timeout(REQUEST_TIMEOUT))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(token: &Token) -> (url::Url, Vec<(String, String)>) {
        let text = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token.value).unwrap()).unwrap();
        let url = url::Url::parse(&text).unwrap();
        let pairs = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        (url, pairs)
    }

    fn get<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {key}"))
    }

    /// The checks of AWS's published signers' tests (aws-msk-iam-sasl-signer-go
    /// TestConstructAuthToken), on a token signed at a fixed time.
    #[test]
    fn a_token_is_the_published_presigned_url_format() {
        let creds = Credentials::new("MOCK-ACCESS-KEY", "MOCK-SECRET-KEY", Some("MOCK-SESSION-TOKEN".into()), None, "test");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000); // 2023-11-14T22:13:20Z
        let token = sign("us-west-2", &creds, at, LIFETIME).unwrap();
        assert!(!token.value.contains(['=', '+', '/']), "base64url without padding");
        let (url, q) = query(&token);
        assert_eq!(url.scheme(), "https");
        assert_eq!(url.host_str(), Some("kafka.us-west-2.amazonaws.com"));
        assert_eq!(url.path(), "/");
        assert_eq!(get(&q, "Action"), "kafka-cluster:Connect");
        assert_eq!(get(&q, "X-Amz-Algorithm"), "AWS4-HMAC-SHA256");
        assert_eq!(get(&q, "X-Amz-Expires"), "900");
        assert_eq!(get(&q, "X-Amz-Security-Token"), "MOCK-SESSION-TOKEN");
        assert_eq!(get(&q, "X-Amz-SignedHeaders"), "host");
        assert_eq!(get(&q, "X-Amz-Credential"), "MOCK-ACCESS-KEY/20231114/us-west-2/kafka-cluster/aws4_request");
        assert_eq!(get(&q, "X-Amz-Date"), "20231114T221320Z");
        assert!(get(&q, "User-Agent").starts_with("toolrank/"));
        assert_eq!(q.last().unwrap().0, "User-Agent", "added after signing, as the published signers do");
        assert_eq!(token.expires_ms, (1_700_000_000 + 900) * 1000);
        assert_eq!(token.principal, "MOCK-ACCESS-KEY");
        assert_eq!(get(&q, "X-Amz-Signature"), KNOWN_SIGNATURE);
    }

    /// The signature of the fixed token above as an independent SigV4 implementation
    /// (Python's hmac and hashlib over the canonical request of AWS's SigV4 documentation)
    /// computes it.
    const KNOWN_SIGNATURE: &str = "86bbb42a6a06ce0e7836eac7947e06a285e8117785e362581fa7341436547ee4";

    #[test]
    fn tokens_come_from_the_provider_on_their_own_thread() {
        let creds = Credentials::new("AKID", "SECRET", None, None, "test");
        let tokens = Tokens::with_provider("eu-west-1", SharedCredentialsProvider::new(creds), Duration::from_secs(60));
        let before = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
        let token = tokens.token().unwrap();
        assert!(token.expires_ms >= before + 59_000 && token.expires_ms <= before + 61_000, "{}", token.expires_ms);
        let (url, _) = query(&token);
        assert_eq!(url.host_str(), Some("kafka.eu-west-1.amazonaws.com"));
    }
}
