//! Borrowed decoding of DynamoDB's typed JSON (`{"S": "..."}`) for the few attributes
//! toolrank reads; every other attribute is skipped without being materialized.

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

/// A JSON string that borrows from the input unless it contains escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// One attribute value: its string when it is of type `S`, otherwise the type it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr<'a> {
    S(Cow<'a, str>),
    Other(String),
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Attr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a DynamoDB attribute value such as {\"S\": \"...\"}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attr<'a>, A::Error> {
                let tag: Str<'de> = map.next_key()?.ok_or_else(|| de::Error::custom("empty attribute value {}"))?;
                let value = if tag.0 == "S" {
                    Attr::S(map.next_value::<Str<'de>>()?.0)
                } else {
                    map.next_value::<IgnoredAny>()?;
                    Attr::Other(tag.0.into_owned())
                };
                if map.next_key::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("attribute value with more than one type"));
                }
                Ok(value)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// The attributes of an `AgentTable` item that toolrank reads.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Image<'a> {
    #[serde(rename = "PK", borrow)]
    pub pk: Option<Attr<'a>>,
    #[serde(rename = "SK", borrow)]
    pub sk: Option<Attr<'a>>,
    #[serde(rename = "EntityType", borrow)]
    pub entity_type: Option<Attr<'a>>,
    #[serde(rename = "TransactDT", borrow)]
    pub transact_dt: Option<Attr<'a>>,
    #[serde(rename = "SuccYN", borrow)]
    pub succ_yn: Option<Attr<'a>>,
    #[serde(rename = "ToolNM", borrow)]
    pub tool_nm: Option<Attr<'a>>,
    #[serde(rename = "AgentNM", borrow)]
    pub agent_nm: Option<Attr<'a>>,
    #[serde(rename = "GSI1_PK", borrow)]
    pub gsi1_pk: Option<Attr<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_borrow_and_other_types_are_named() {
        let img: Image =
            serde_json::from_str(r#"{"PK":{"S":"USR001#S1"},"SK":{"S":"a\"b"},"TransactDT":{"N":"1"},"ToolValues":{"M":{"x":{"S":"y"}}}}"#).unwrap();
        assert!(matches!(img.pk, Some(Attr::S(Cow::Borrowed("USR001#S1")))));
        assert_eq!(img.sk, Some(Attr::S(Cow::Owned("a\"b".into()))));
        assert_eq!(img.transact_dt, Some(Attr::Other("N".into())));
        assert!(serde_json::from_str::<Image>(r#"{"PK":{"S":1}}"#).is_err());
        assert!(serde_json::from_str::<Image>(r#"{"PK":{}}"#).is_err());
        assert!(serde_json::from_str::<Image>(r#"{"PK":{"S":"a","N":"1"}}"#).is_err());
    }
}
