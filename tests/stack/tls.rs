//! Secure connections: the Kafka path through a TLS broker (stunnel in front of tansu)
//! that requires SASL/SCRAM-SHA-512, into a TLS Valkey with an ACL user (redis-server),
//! with the CA and passwords from files; and settings the servers refuse, which stop a
//! command at start with the cause.

use crate::support::*;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn tls_file(name: &str) -> String {
    PathBuf::from(env("TOOLRANK_TEST_TLS_DIR")).join(name).to_str().unwrap().to_owned()
}

/// A test whose every command reaches Kafka over TLS (brokers and a properties file from
/// the environment, as infra/local/up writes it, with the SCRAM user's password) and Valkey over TLS as an ACL user (CA and password files).
fn secure_live(partitions: &str) -> Live {
    Live::with_env(
        partitions,
        vec![
            ("TOOLRANK_KAFKA_BROKERS", env("TOOLRANK_TEST_KAFKA_TLS_BROKERS")),
            ("TOOLRANK_KAFKA_CONFIG_FILE", tls_file("kafka.properties")),
            ("TOOLRANK_VALKEY_URL", env("TOOLRANK_TEST_VALKEY_TLS_URL")),
            ("TOOLRANK_VALKEY_CA_FILE", tls_file("ca.pem")),
            ("TOOLRANK_VALKEY_PASSWORD_FILE", tls_file("valkey-password")),
        ],
    )
}

#[test]
fn the_seed_through_a_tls_broker_reaches_a_tls_valkey_as_an_acl_user() {
    let live = secure_live("3");
    live.seed_reaches_both_sinks(Some(&env("TOOLRANK_TEST_VALKEY_TLS_URL")));
    assert_seed_access_patterns(&live.table);
}

/// 4,000 generated sessions with redeliveries, modifies and removes, over TLS both ways.
#[test]
fn a_dirty_stream_over_tls_leaves_both_sinks_equal_to_replay() {
    let live = secure_live("4");
    let history = generated(&live, "4000", "23");
    live.toolrank(&["produce", "--topic", &live.topic, &history]);
    let summary = live.drain(&[]);
    assert!(summary.contains(" 0 dead-lettered"), "{summary}");
    live.assert_sinks_equal_replay(&history, Some(&env("TOOLRANK_TEST_VALKEY_TLS_URL")));
}

/// A refused setting: what it is, the environment and flags that make it, and the
/// endpoint and cause the error must name.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<String>, [&'a str; 2]);

/// Each setting the servers refuse ends `consume kafka` within seconds, non-zero, with
/// an error naming the endpoint and the cause, no secret in what it printed, and nothing
/// written to the sinks.
#[test]
fn settings_the_servers_refuse_stop_the_consumer_at_start_with_the_cause() {
    let live = Live::new("1");
    let password = std::fs::read_to_string(tls_file("valkey-password")).unwrap().trim().to_owned();
    let kafka_password = std::fs::read_to_string(tls_file("kafka-password")).unwrap().trim().to_owned();
    let (tls_kafka, plain_kafka) = (env("TOOLRANK_TEST_KAFKA_TLS_BROKERS"), env("TOOLRANK_KAFKA_BROKERS"));
    let valkey_tls = env("TOOLRANK_TEST_VALKEY_TLS_URL").replace("rediss://", "");
    let (valkey_host, plain_valkey) = (valkey_tls.split('@').nth(1).unwrap().to_owned(), env("TOOLRANK_VALKEY_URL"));
    let (good_kafka, wrong_ca) = (tls_file("kafka.properties"), tls_file("kafka-other-ca.properties"));
    let good_valkey = format!("rediss://toolrank:{password}@{valkey_host}");
    // (what, environment, extra flags, the endpoint and the cause the error must name)
    let cases: Vec<Case> = vec![
        (
            "kafka: a CA that did not sign the broker's certificate",
            vec![("TOOLRANK_KAFKA_BROKERS", tls_kafka.clone()), ("TOOLRANK_KAFKA_CONFIG_FILE", wrong_ca)],
            vec![],
            [&tls_kafka, "certificate verify failed"],
        ),
        (
            "kafka: a wrong SCRAM password",
            vec![("TOOLRANK_KAFKA_BROKERS", tls_kafka.clone()), ("TOOLRANK_KAFKA_CONFIG_FILE", tls_file("kafka-wrong-password.properties"))],
            vec![],
            [&tls_kafka, "SASL SCRAM authentication failed"],
        ),
        ("kafka: plaintext to the TLS port", vec![("TOOLRANK_KAFKA_BROKERS", tls_kafka.clone())], vec![], [&tls_kafka, "security.protocol=SSL"]),
        (
            "kafka: TLS to a plaintext port",
            vec![("TOOLRANK_KAFKA_BROKERS", plain_kafka.clone()), ("TOOLRANK_KAFKA_CONFIG_FILE", good_kafka.clone())],
            vec![],
            [&plain_kafka, "plaintext port"],
        ),
        (
            "kafka: an unknown property",
            vec![],
            vec!["--kafka-config".into(), format!("sasl.pasword={password}")],
            [&plain_kafka, "No such configuration property: \"sasl.pasword\""],
        ),
        (
            "valkey: a CA that did not sign the server's certificate",
            vec![("TOOLRANK_VALKEY_CA_FILE", tls_file("other-ca.pem"))],
            vec!["--valkey-url".into(), good_valkey.clone()],
            [&valkey_host, "UnknownIssuer"],
        ),
        (
            "valkey: a wrong password",
            vec![("TOOLRANK_VALKEY_CA_FILE", tls_file("ca.pem"))],
            vec!["--valkey-url".into(), format!("rediss://toolrank:not-{password}@{valkey_host}")],
            [&valkey_host, "authentication failed"],
        ),
        (
            "valkey: plaintext to the TLS port",
            vec![],
            vec!["--valkey-url".into(), format!("redis://toolrank:{password}@{valkey_host}")],
            [&valkey_host, "is this a TLS port"],
        ),
        (
            "valkey: TLS to a plaintext port",
            vec![("TOOLRANK_VALKEY_CA_FILE", tls_file("ca.pem"))],
            vec!["--valkey-url".into(), plain_valkey.replace("redis://", "rediss://")],
            [plain_valkey.trim_start_matches("redis://"), "is this a plaintext port"],
        ),
    ];
    for (what, environment, extra, [endpoint, cause]) in cases {
        let mut args = live.kafka_args();
        args.extend(extra.iter().map(String::as_str));
        let started = Instant::now();
        let mut cmd = live.command();
        cmd.args(&args).envs(environment).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = Running::spawn(&mut cmd).wait(Duration::from_secs(60));
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{what}: exits non-zero: {said}");
        assert!(started.elapsed() < Duration::from_secs(15), "{what}: within seconds, took {:?}: {said}", started.elapsed());
        let error = said.lines().find(|l| l.starts_with("toolrank: error")).unwrap_or_default();
        assert!(error.contains(endpoint) && error.to_lowercase().contains(&cause.to_lowercase()), "{what}: names {endpoint} and {cause:?}: {said}");
        assert!(!said.contains(&password) && !said.contains(&kafka_password), "{what}: no secret printed: {said}");
    }
    // Nothing was written: the test's namespace and table hold no rankings.
    let out = live.dir.path().join("results");
    live.toolrank(&["results", "--from", "valkey", "--namespace", &live.namespace, "--today", TODAY, "--out", out.to_str().unwrap()]);
    live.toolrank(&["results", "--from", "dynamodb", "--table", &live.table, "--today", TODAY, "--out", out.join("ddb").to_str().unwrap()]);
    for t in TABLES {
        assert_eq!(read_table(&out, t), "", "valkey {t}");
        assert_eq!(read_table(&out.join("ddb"), t), "", "dynamodb {t}");
    }
}
