//! String interning: ids, names and pattern sequences become small integers so that the
//! per-event path hashes a few short keys and allocates nothing for known values.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::hash::Hash;

/// An interned value's id.
pub type Sym = u32;

/// Interns values of `T` (strings or symbol sequences). Only the values are serialized;
/// the lookup index is rebuilt on restore.
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "Box<T>: Serialize", deserialize = "Box<T>: Deserialize<'de>"))]
pub struct Interner<T: ?Sized + Eq + Hash> {
    values: Vec<Box<T>>,
    #[serde(skip)]
    index: FxHashMap<Box<T>, Sym>,
}

impl<T: ?Sized + Eq + Hash> Default for Interner<T> {
    fn default() -> Self {
        Self { values: Vec::new(), index: FxHashMap::default() }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T>
where
    Box<T>: for<'a> From<&'a T> + Clone,
{
    pub fn intern(&mut self, value: &T) -> Sym {
        if let Some(&id) = self.index.get(value) {
            return id;
        }
        let id = Sym::try_from(self.values.len()).expect("fewer than 2^32 distinct values");
        let boxed: Box<T> = value.into();
        self.values.push(boxed.clone());
        self.index.insert(boxed, id);
        id
    }

    pub fn lookup(&self, value: &T) -> Option<Sym> {
        self.index.get(value).copied()
    }

    pub fn get(&self, id: Sym) -> &T {
        &self.values[id as usize]
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Rebuilds the lookup index after deserialization.
    pub fn rebuild(&mut self) {
        self.index = self.values.iter().enumerate().map(|(i, v)| (v.clone(), i as Sym)).collect();
    }

    /// Approximate heap bytes, counting each value twice (list and index).
    pub fn heap_bytes(&self) -> usize {
        let per = std::mem::size_of::<Box<T>>() * 2 + std::mem::size_of::<Sym>() + 8;
        self.values.iter().map(|v| std::mem::size_of_val::<T>(v) * 2 + per).sum()
    }
}
