//! The stable hash of a key or value, for the digest of a table's contents (`crate::digest`)
//! and for finding a bag's objects (`crate::bag`): a `serde` serializer that feeds each
//! primitive of the value to a word-at-a-time hasher in a fixed layout, without encoding it.
//!
//! Every node must compute the same hash of the same record, so nothing here depends on a
//! random seed, the process, the platform's word size or its byte order. The layout:
//! integers little-endian at their full width (`usize` and `isize` as 64 bits, 128-bit ones as
//! two words, low first), floats by their bits, `bool` and `Option`'s tag as one byte, an enum
//! variant by its index (32 bits) then its fields, a string or byte string by its length
//! (64 bits) then its bytes, a sequence or map by its items then their count (64 bits),
//! tuples and structs by their fields. The hasher mixes in each eight bytes of that stream
//! with one multiply; a 64-bit integer at a word boundary is one multiply.
//!
//! Common types take a shortcut to the same result ([`stable_hash`]): an integer key, a
//! string, a byte vector or a byte array is hashed as its bytes in whole words, where `serde`
//! would hand over a byte array one byte at a time.
//!
//! A change of any of this changes every digest: it goes with a new
//! `proto::PROTOCOL_VERSION`, so that nodes that would compute different digests refuse each
//! other at the handshake. The hash of a key is pinned by a test.

use std::any::Any;

use serde::ser::{self, Serialize};

pub(crate) const P0: u64 = 0xa076_1d64_78bd_642f;
pub(crate) const P1: u64 = 0xe703_7ed1_a0b4_28db;
pub(crate) const P2: u64 = 0x8ebc_6af0_9c88_c6e3;

/// The high and low halves of the full product, folded: a fast mix with good avalanche.
#[inline]
pub(crate) fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// A hasher of a byte stream, eight bytes at a time, read little-endian: each whole word is
/// mixed in with one multiply.
#[derive(Debug, Clone)]
pub(crate) struct WordHasher {
    h: u64,
    /// Bytes not yet mixed in, the first in the lowest byte.
    word: u64,
    /// Bits of `word` in use (0 to 56, a multiple of 8).
    bits: u32,
    /// Words mixed in.
    words: u64,
}

impl WordHasher {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            h: seed ^ P2,
            word: 0,
            bits: 0,
            words: 0,
        }
    }

    #[inline]
    fn mix(&mut self, w: u64) {
        self.h = fold_mul(self.h ^ w, P1);
        self.words += 1;
    }

    /// Eight bytes, as `u64::to_le_bytes` gives them.
    #[inline]
    pub(crate) fn write_u64(&mut self, x: u64) {
        if self.bits == 0 {
            self.mix(x);
        } else {
            let w = self.word | (x << self.bits);
            self.mix(w);
            self.word = x >> (64 - self.bits);
        }
    }

    /// The low `n` bytes of `x` (`n` of 1, 2 or 4; the rest of `x` is zero), little-endian.
    #[inline]
    fn write_small(&mut self, x: u64, n: u32) {
        let bits = self.bits;
        self.word |= x << bits;
        self.bits += 8 * n;
        if self.bits >= 64 {
            self.bits -= 64;
            let w = self.word;
            self.mix(w);
            // The bytes of `x` past the word (none if it ended it exactly).
            self.word = if self.bits == 0 { 0 } else { x >> (64 - bits) };
        }
    }

    /// One byte.
    #[inline]
    pub(crate) fn push(&mut self, b: u8) {
        self.write_small(u64::from(b), 1);
    }

    /// Bytes as they are: whole words straight in.
    #[inline]
    pub(crate) fn write(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.push(b);
        }
    }

    /// The hash of every byte written so far (their number included).
    pub(crate) fn finish(&self) -> u64 {
        let len = self.words * 8 + u64::from(self.bits / 8);
        let h = fold_mul(self.h ^ self.word ^ P0, P1 ^ len);
        fold_mul(h, P2)
    }
}

/// The stable hash of a value (0 if it does not serialize: such a value cannot be written
/// either, since the write encodes it).
#[inline]
pub(crate) fn stable_hash<T: Serialize + 'static>(t: &T, seed: u64) -> u64 {
    let mut h = WordHasher::new(seed);
    if !shortcut(t as &dyn Any, &mut h) && t.serialize(&mut h).is_err() {
        return 0;
    }
    h.finish()
}

/// Feeds the common types' layout straight to `h` (what their serialization feeds, in whole
/// words); false for any other type.
#[inline]
fn shortcut(t: &dyn Any, h: &mut WordHasher) -> bool {
    /// A byte string, or a sequence of bytes (then its count follows).
    fn bytes(h: &mut WordHasher, b: &[u8], seq: bool) {
        if seq {
            h.write(b);
            h.write_u64(b.len() as u64);
        } else {
            h.write_u64(b.len() as u64);
            h.write(b);
        }
    }
    if let Some(x) = t.downcast_ref::<u64>() {
        h.write_u64(*x);
    } else if let Some(x) = t.downcast_ref::<i64>() {
        h.write_u64(*x as u64);
    } else if let Some(x) = t.downcast_ref::<u32>() {
        h.write_small(u64::from(*x), 4);
    } else if let Some(x) = t.downcast_ref::<i32>() {
        h.write_small(u64::from(*x as u32), 4);
    } else if let Some(s) = t.downcast_ref::<String>() {
        bytes(h, s.as_bytes(), false);
    } else if let Some(v) = t.downcast_ref::<Vec<u8>>() {
        bytes(h, v, true);
    } else if let Some(a) = t.downcast_ref::<[u8; 8]>() {
        h.write(a);
    } else if let Some(a) = t.downcast_ref::<[u8; 16]>() {
        h.write(a);
    } else if let Some(a) = t.downcast_ref::<[u8; 32]>() {
        h.write(a);
    } else {
        return false;
    }
    true
}

/// A value that did not serialize.
#[derive(Debug)]
pub(crate) struct Unhashable;

impl std::fmt::Display for Unhashable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a value that does not serialize")
    }
}

impl std::error::Error for Unhashable {}

impl ser::Error for Unhashable {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Unhashable
    }
}

type R = Result<(), Unhashable>;

/// A sequence or map: its items, then their count.
pub(crate) struct Counted<'a> {
    h: &'a mut WordHasher,
    n: u64,
}

impl<'a> ser::Serializer for &'a mut WordHasher {
    type Ok = ();
    type Error = Unhashable;
    type SerializeSeq = Counted<'a>;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Counted<'a>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> R {
        self.push(u8::from(v));
        Ok(())
    }
    #[inline]
    fn serialize_i8(self, v: i8) -> R {
        self.push(v as u8);
        Ok(())
    }
    #[inline]
    fn serialize_i16(self, v: i16) -> R {
        self.write_small(u64::from(v as u16), 2);
        Ok(())
    }
    #[inline]
    fn serialize_i32(self, v: i32) -> R {
        self.write_small(u64::from(v as u32), 4);
        Ok(())
    }
    #[inline]
    fn serialize_i64(self, v: i64) -> R {
        self.write_u64(v as u64);
        Ok(())
    }
    #[inline]
    fn serialize_i128(self, v: i128) -> R {
        self.serialize_u128(v as u128)
    }
    #[inline]
    fn serialize_u8(self, v: u8) -> R {
        self.push(v);
        Ok(())
    }
    #[inline]
    fn serialize_u16(self, v: u16) -> R {
        self.write_small(u64::from(v), 2);
        Ok(())
    }
    #[inline]
    fn serialize_u32(self, v: u32) -> R {
        self.write_small(u64::from(v), 4);
        Ok(())
    }
    #[inline]
    fn serialize_u64(self, v: u64) -> R {
        self.write_u64(v);
        Ok(())
    }
    #[inline]
    fn serialize_u128(self, v: u128) -> R {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
        Ok(())
    }
    #[inline]
    fn serialize_f32(self, v: f32) -> R {
        self.serialize_u32(v.to_bits())
    }
    #[inline]
    fn serialize_f64(self, v: f64) -> R {
        self.write_u64(v.to_bits());
        Ok(())
    }
    #[inline]
    fn serialize_char(self, v: char) -> R {
        self.serialize_u32(u32::from(v))
    }
    #[inline]
    fn serialize_str(self, v: &str) -> R {
        self.serialize_bytes(v.as_bytes())
    }
    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> R {
        self.write_u64(v.len() as u64);
        self.write(v);
        Ok(())
    }
    #[inline]
    fn serialize_none(self) -> R {
        self.push(0);
        Ok(())
    }
    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> R {
        self.push(1);
        value.serialize(self)
    }
    #[inline]
    fn serialize_unit(self) -> R {
        Ok(())
    }
    #[inline]
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    #[inline]
    fn serialize_unit_variant(self, _: &'static str, index: u32, _: &'static str) -> R {
        self.serialize_u32(index)
    }
    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> R {
        value.serialize(self)
    }
    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        value: &T,
    ) -> R {
        self.write_small(u64::from(index), 4);
        value.serialize(self)
    }
    #[inline]
    fn serialize_seq(self, _: Option<usize>) -> Result<Counted<'a>, Unhashable> {
        Ok(Counted { h: self, n: 0 })
    }
    #[inline]
    fn serialize_tuple(self, _: usize) -> Result<Self, Unhashable> {
        Ok(self)
    }
    #[inline]
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Unhashable> {
        Ok(self)
    }
    #[inline]
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Unhashable> {
        self.write_small(u64::from(index), 4);
        Ok(self)
    }
    #[inline]
    fn serialize_map(self, _: Option<usize>) -> Result<Counted<'a>, Unhashable> {
        Ok(Counted { h: self, n: 0 })
    }
    #[inline]
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Unhashable> {
        Ok(self)
    }
    #[inline]
    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Unhashable> {
        self.write_small(u64::from(index), 4);
        Ok(self)
    }
}

impl ser::SerializeSeq for Counted<'_> {
    type Ok = ();
    type Error = Unhashable;
    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        self.n += 1;
        value.serialize(&mut *self.h)
    }
    #[inline]
    fn end(self) -> R {
        self.h.write_u64(self.n);
        Ok(())
    }
}

impl ser::SerializeMap for Counted<'_> {
    type Ok = ();
    type Error = Unhashable;
    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> R {
        self.n += 1;
        key.serialize(&mut *self.h)
    }
    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
        value.serialize(&mut *self.h)
    }
    #[inline]
    fn end(self) -> R {
        self.h.write_u64(self.n);
        Ok(())
    }
}

/// Tuples, structs and their variants: the fields in order, nothing else.
macro_rules! fields {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for &mut WordHasher {
            type Ok = ();
            type Error = Unhashable;
            #[inline]
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> R {
                value.serialize(&mut **self)
            }
            #[inline]
            fn end(self) -> R {
                Ok(())
            }
        }
    )*};
}

fields!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeStruct for &mut WordHasher {
    type Ok = ();
    type Error = Unhashable;
    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> R {
        value.serialize(&mut **self)
    }
    #[inline]
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut WordHasher {
    type Ok = ();
    type Error = Unhashable;
    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> R {
        value.serialize(&mut **self)
    }
    #[inline]
    fn end(self) -> R {
        Ok(())
    }
}

/// The hash of a key: picks its digest bucket and enters its records' hashes
/// (`crate::digest`).
#[inline]
pub(crate) fn key_hash<K: Serialize + 'static>(k: &K) -> u64 {
    stable_hash(k, 1)
}

/// The hash of a value (a bag object's identity, and part of a record's digest hash).
#[inline]
pub(crate) fn value_hash<V: Serialize + 'static>(v: &V) -> u64 {
    stable_hash(v, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The serializer's hash, without the shortcut.
    fn general<T: Serialize>(t: &T, seed: u64) -> u64 {
        let mut h = WordHasher::new(seed);
        t.serialize(&mut h).unwrap();
        h.finish()
    }

    #[test]
    fn words_and_small_writes_hash_as_their_bytes_at_any_offset() {
        // Each shape of write after every offset into a word, against the same bytes pushed
        // one at a time.
        for lead in 0..9u8 {
            let mut a = WordHasher::new(7);
            let mut b = WordHasher::new(7);
            let mut bytes: Vec<u8> = (0..lead).collect();
            for &x in &bytes {
                a.push(x);
            }
            a.write_small(0xbeef, 2);
            a.write_small(0xdead_beef, 4);
            a.write_u64(0x0102_0304_0506_0708);
            a.write(b"seventeen bytes!!");
            bytes.extend(0xbeef_u16.to_le_bytes());
            bytes.extend(0xdead_beef_u32.to_le_bytes());
            bytes.extend(0x0102_0304_0506_0708_u64.to_le_bytes());
            bytes.extend(b"seventeen bytes!!");
            for &x in &bytes {
                b.push(x);
            }
            assert_eq!(a.finish(), b.finish(), "after {lead} bytes");
        }
        // The number of bytes counts: a trailing zero byte is not nothing.
        let mut z = WordHasher::new(1);
        z.push(0);
        assert_ne!(z.finish(), WordHasher::new(1).finish());
        assert_ne!(WordHasher::new(1).finish(), WordHasher::new(2).finish());
    }

    #[test]
    fn the_shortcuts_give_what_the_serializer_gives() {
        for seed in [1, 2] {
            for x in [0u64, 1, 300, u64::MAX] {
                assert_eq!(stable_hash(&x, seed), general(&x, seed));
                assert_eq!(stable_hash(&(x as i64), seed), general(&(x as i64), seed));
                assert_eq!(stable_hash(&(x as u32), seed), general(&(x as u32), seed));
                assert_eq!(stable_hash(&(x as i32), seed), general(&(x as i32), seed));
            }
            for s in ["", "a", "exactly8", "a string longer than two words"] {
                assert_eq!(stable_hash(&s.to_string(), seed), general(&s, seed));
                let v = s.as_bytes().to_vec();
                assert_eq!(stable_hash(&v, seed), general(&v, seed));
            }
            let a: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
            assert_eq!(stable_hash(&a, seed), general(&a, seed));
            let b: [u8; 16] = std::array::from_fn(|i| a[i]);
            assert_eq!(stable_hash(&b, seed), general(&b, seed));
            let c: [u8; 8] = std::array::from_fn(|i| a[i]);
            assert_eq!(stable_hash(&c, seed), general(&c, seed));
        }
    }

    #[derive(serde::Serialize)]
    enum E {
        Unit,
        Pair(u16, Option<String>),
        Rec { a: i8, b: Vec<u32>, c: f64 },
    }

    #[test]
    fn the_hash_is_pinned_and_tells_values_apart() {
        // Pinned: a change of these is a change of every digest, and of the wire protocol
        // (proto::PROTOCOL_VERSION).
        assert_eq!(stable_hash(&42u64, 1), 0x353a_9845_2222_5fc8);
        let e = E::Rec {
            a: -1,
            b: vec![1, 2],
            c: 0.5,
        };
        assert_eq!(
            stable_hash(&("key".to_string(), e), 2),
            0x71af_0a5b_57ec_1728
        );
        // Nearby values differ.
        let all = [
            stable_hash(&E::Unit, 2),
            stable_hash(&E::Pair(1, None), 2),
            stable_hash(&E::Pair(1, Some(String::new())), 2),
            stable_hash(&E::Pair(256, None), 2),
            stable_hash(&("ab".to_string(), "c".to_string()), 2),
            stable_hash(&("a".to_string(), "bc".to_string()), 2),
            stable_hash(&vec![vec![1u8], vec![]], 2),
            stable_hash(&vec![vec![], vec![1u8]], 2),
            stable_hash(&1u64, 1),
            stable_hash(&2u64, 1),
        ];
        let distinct: std::collections::HashSet<u64> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "{all:x?}");
    }
}
