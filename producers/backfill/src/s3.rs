//! DynamoDB exports in S3 (`s3://bucket/prefix`): found through their
//! `manifest-files.json`, each data file downloaded to a temporary file just before it is
//! read, so memory stays bounded whatever the export's size.

use crate::Error;
use aws_sdk_s3::Client;
use std::collections::HashSet;
use std::io::Write;

/// One data file of an export in S3.
#[derive(Clone, Debug)]
pub struct Object {
    pub bucket: String,
    pub key: String,
}

impl Object {
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

fn s3_error(what: &str, e: impl std::error::Error) -> Error {
    Error::Input(format!("{what}: {}", aws_sdk_s3::error::DisplayErrorContext(e)))
}

/// Splits `s3://bucket/prefix`.
pub fn parse_url(url: &str) -> Result<(String, String), Error> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| Error::Input(format!("{url:?} is not an s3://bucket/prefix path")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Input(format!("{url:?} names no bucket")));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

async fn list(client: &Client, bucket: &str, prefix: &str) -> Result<Vec<String>, Error> {
    let mut keys = Vec::new();
    let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| s3_error(&format!("listing s3://{bucket}/{prefix}"), e))?;
        keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
    }
    Ok(keys)
}

async fn read_text(client: &Client, bucket: &str, key: &str) -> Result<String, Error> {
    let what = format!("reading s3://{bucket}/{key}");
    let out = client.get_object().bucket(bucket).key(key).send().await.map_err(|e| s3_error(&what, e))?;
    let bytes = out.body.collect().await.map_err(|e| Error::Input(format!("{what}: {e}")))?.into_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::Input(format!("{what}: not UTF-8 text")))
}

/// The data files of the export at `url`, in manifest order: `url` is the export's folder
/// (or a prefix holding exactly one export), its `manifest-files.json`, or one data file.
pub async fn export_objects(client: &Client, url: &str) -> Result<Vec<Object>, Error> {
    let (bucket, prefix) = parse_url(url)?;
    let object = |key: String| Object { bucket: bucket.clone(), key };
    if prefix.ends_with(".json.gz") || (prefix.ends_with(".json") && !prefix.ends_with("manifest-files.json")) {
        return Ok(vec![object(prefix)]);
    }
    let keys = list(client, &bucket, &prefix).await?;
    let manifests: Vec<&String> = keys.iter().filter(|k| k.ends_with("manifest-files.json")).collect();
    let manifest = match manifests.as_slice() {
        [one] => (*one).clone(),
        [] => {
            let data: Vec<String> = keys.iter().filter(|k| k.contains("/data/") && k.ends_with(".json.gz")).cloned().collect();
            if data.is_empty() {
                return Err(Error::Input(format!("{url}: no manifest-files.json and no data/*.json.gz under it")));
            }
            return Ok(data.into_iter().map(object).collect());
        }
        many => {
            let names: Vec<&str> = many.iter().map(|k| k.trim_end_matches("manifest-files.json")).collect();
            return Err(Error::Input(format!("{url} holds {} exports; name one: {}", many.len(), names.join(", "))));
        }
    };
    let folder = manifest.trim_end_matches("manifest-files.json");
    let present: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let text = read_text(client, &bucket, &manifest).await?;
    let manifest_url = format!("s3://{bucket}/{manifest}");
    let mut objects = Vec::new();
    for (line, key) in toolrank_source_file::manifest_keys(&text, &manifest_url)? {
        // As written by the export, else by file name in the folder's data/ (a copied export).
        let by_name = key.rsplit('/').next().map(|name| format!("{folder}data/{name}"));
        let found = std::iter::once(key.clone()).chain(by_name).find(|k| present.contains(k.as_str()));
        let key = found.ok_or_else(|| Error::Input(format!("{manifest_url}, line {line}: data file {key} is not in the bucket")))?;
        objects.push(object(key));
    }
    Ok(objects)
}

/// Downloads `object` into a temporary file (deleted when dropped), chunk by chunk.
pub(crate) async fn download(client: &Client, object: &Object) -> Result<tempfile::NamedTempFile, Error> {
    let what = format!("downloading {}", object.url());
    let out = client.get_object().bucket(&object.bucket).key(&object.key).send().await.map_err(|e| s3_error(&what, e))?;
    let mut file = tempfile::NamedTempFile::new().map_err(|e| Error::Input(format!("{what}: {e}")))?;
    let mut body = out.body;
    while let Some(chunk) = body.try_next().await.map_err(|e| Error::Input(format!("{what}: {e}")))? {
        file.write_all(&chunk).map_err(|e| Error::Input(format!("{what}: {e}")))?;
    }
    file.flush().map_err(|e| Error::Input(format!("{what}: {e}")))?;
    Ok(file)
}

/// An S3 client from the environment; path-style addressing when the endpoint is
/// overridden (local S3-compatible servers).
pub async fn client() -> Client {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let path_style = std::env::var_os("AWS_ENDPOINT_URL_S3").is_some() || std::env::var_os("AWS_ENDPOINT_URL").is_some();
    Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(path_style).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(parse_url("s3://b/AWSDynamoDB/01/").unwrap(), ("b".into(), "AWSDynamoDB/01/".into()));
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), String::new()));
        assert!(parse_url("/tmp/x").is_err() && parse_url("s3:///x").is_err());
    }
}
