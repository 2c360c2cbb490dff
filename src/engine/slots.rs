//! A slab whose storage grows in fixed chunks instead of doubling: keys
//! are stable indices, as in the `slab` crate, but a shard holding 5,000
//! connections pays for at most one partly used chunk, not for 3,000 empty
//! slots of a doubled vector (and never copies every connection to grow).
//! Chunks left entirely empty at the end are given back by
//! [`Slots::shrink`].

/// Slots per chunk.
const CHUNK: usize = 256;

#[derive(Debug)]
enum Entry<T> {
    Occupied(T),
    /// Vacant; the next vacant slot (`usize::MAX`: none).
    Vacant(usize),
}

/// Stable-keyed storage in chunks of 256 slots.
#[derive(Debug)]
pub struct Slots<T> {
    chunks: Vec<Box<[Entry<T>]>>,
    /// First vacant slot (`usize::MAX`: none).
    free: usize,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slots<T> {
    pub const fn new() -> Slots<T> {
        Slots {
            chunks: Vec::new(),
            free: usize::MAX,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    fn entry(&self, key: usize) -> Option<&Entry<T>> {
        self.chunks.get(key / CHUNK).map(|c| &c[key % CHUNK])
    }

    fn entry_mut(&mut self, key: usize) -> Option<&mut Entry<T>> {
        self.chunks
            .get_mut(key / CHUNK)
            .map(|c| &mut c[key % CHUNK])
    }

    /// Stores `value`; returns its key.
    pub fn insert(&mut self, value: T) -> usize {
        if self.free == usize::MAX {
            let base = self.capacity();
            let chunk: Box<[Entry<T>]> = (0..CHUNK)
                .map(|i| {
                    Entry::Vacant(if i + 1 < CHUNK {
                        base + i + 1
                    } else {
                        usize::MAX
                    })
                })
                .collect();
            self.chunks.push(chunk);
            self.free = base;
        }
        let key = self.free;
        let slot = self
            .entry_mut(key)
            .expect("the free list points into a chunk");
        let Entry::Vacant(next) = *slot else {
            unreachable!("the free list holds vacant slots only")
        };
        *slot = Entry::Occupied(value);
        self.free = next;
        self.len += 1;
        key
    }

    pub fn get(&self, key: usize) -> Option<&T> {
        match self.entry(key)? {
            Entry::Occupied(v) => Some(v),
            Entry::Vacant(_) => None,
        }
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        match self.entry_mut(key)? {
            Entry::Occupied(v) => Some(v),
            Entry::Vacant(_) => None,
        }
    }

    /// Takes the value out of `key`, if there is one.
    pub fn try_remove(&mut self, key: usize) -> Option<T> {
        let free = self.free;
        let slot = self.entry_mut(key)?;
        if matches!(slot, Entry::Vacant(_)) {
            return None;
        }
        let Entry::Occupied(v) = std::mem::replace(slot, Entry::Vacant(free)) else {
            unreachable!("checked above")
        };
        self.free = key;
        self.len -= 1;
        Some(v)
    }

    /// Every occupied slot with its key.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk.iter().enumerate().filter_map(move |(i, e)| match e {
                Entry::Occupied(v) => Some((c * CHUNK + i, v)),
                Entry::Vacant(_) => None,
            })
        })
    }

    /// Every occupied slot with its key, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.chunks.iter_mut().enumerate().flat_map(|(c, chunk)| {
            chunk
                .iter_mut()
                .enumerate()
                .filter_map(move |(i, e)| match e {
                    Entry::Occupied(v) => Some((c * CHUNK + i, v)),
                    Entry::Vacant(_) => None,
                })
        })
    }

    /// Frees the chunks at the end that hold nothing (keys stay valid).
    pub fn shrink(&mut self) {
        let mut keep = self.chunks.len();
        while keep > 0
            && self.chunks[keep - 1]
                .iter()
                .all(|e| matches!(e, Entry::Vacant(_)))
        {
            keep -= 1;
        }
        if keep == self.chunks.len() {
            return;
        }
        self.chunks.truncate(keep);
        self.chunks.shrink_to_fit();
        // Rebuild the free list over what is left, lowest keys first.
        let mut next = usize::MAX;
        for key in (0..self.capacity()).rev() {
            if let Some(slot @ Entry::Vacant(_)) = self.entry_mut(key) {
                *slot = Entry::Vacant(next);
                next = key;
            }
        }
        self.free = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_reused() {
        let mut s = Slots::new();
        let keys: Vec<usize> = (0..1000).map(|i| s.insert(i)).collect();
        assert_eq!(s.len(), 1000);
        assert_eq!(s.capacity(), 4 * CHUNK, "grown by chunks, not doubled");
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(s.get(k), Some(&i));
        }
        assert_eq!(s.try_remove(keys[10]), Some(10));
        assert_eq!(s.try_remove(keys[10]), None);
        assert_eq!(s.get(keys[10]), None);
        assert_eq!(s.insert(77), keys[10], "the freed slot is reused first");
        *s.get_mut(keys[11]).unwrap() += 1;
        assert_eq!(s.get(keys[11]), Some(&12));
        assert_eq!(s.iter().count(), 1000);
        assert_eq!(s.get(usize::MAX), None);
    }

    #[test]
    fn empty_chunks_at_the_end_are_given_back() {
        let mut s = Slots::new();
        let keys: Vec<usize> = (0..3 * CHUNK).map(|i| s.insert(i)).collect();
        for &k in &keys[CHUNK / 2..] {
            s.try_remove(k);
        }
        s.shrink();
        assert_eq!(s.capacity(), CHUNK);
        for &k in &keys[..CHUNK / 2] {
            assert!(s.get(k).is_some(), "surviving keys stay valid");
        }
        // The rebuilt free list fills the remaining holes before growing.
        for _ in 0..CHUNK / 2 {
            assert!(s.insert(0) < CHUNK);
        }
        assert_eq!(s.capacity(), CHUNK);
        assert!(s.insert(0) >= CHUNK);
        let all: Vec<usize> = s.iter().map(|(k, _)| k).collect();
        for k in all {
            s.try_remove(k);
        }
        s.shrink();
        assert_eq!(s.capacity(), 0);
        assert!(s.is_empty());
    }
}
