//! An upload's part index: its parts by number, and where each of the parts stored without a
//! gap from the first one ends. Both questions asked on every chunk and every chunk test (is
//! the file complete? how many bytes from the start are stored?) are then a lookup, not a walk
//! over every part: a 16 GiB file in 1 MiB chunks has 16,384 parts, and walking them made
//! each chunk of a long upload slower than the one before.

use super::StoredPart;
use std::collections::BTreeMap;

/// An upload's stored parts, by number. Read it as the map it derefs to; change it with
/// [`insert`](Self::insert) and [`remove`](Self::remove), which keep the ends in step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartIndex {
    parts: BTreeMap<u64, StoredPart>,
    /// `ends[i]`: where part `i + 1` ends, for parts 1, 2, ... up to the first missing one (or
    /// up to the first whose end would pass `u64::MAX`).
    ends: Vec<u64>,
}

impl PartIndex {
    pub fn new() -> PartIndex {
        PartIndex::default()
    }

    /// Adds or replaces part `number`; returns the part it replaced.
    pub fn insert(&mut self, number: u64, part: StoredPart) -> Option<StoredPart> {
        let old = self.parts.insert(number, part);
        self.changed_from(number);
        old
    }

    /// Removes part `number`; returns it.
    pub fn remove(&mut self, number: &u64) -> Option<StoredPart> {
        let old = self.parts.remove(number)?;
        self.changed_from(*number);
        Some(old)
    }

    /// If parts 1..=K are stored and part K is the first to end exactly at `length`, returns K
    /// (0 for an empty file with no part at all: a tus upload created whole).
    pub fn complete_count(&self, length: u64) -> Option<u64> {
        if length == 0 && self.parts.is_empty() {
            return Some(0);
        }
        let first = self.ends.partition_point(|&end| end < length);
        (self.ends.get(first) == Some(&length)).then_some(first as u64 + 1)
    }

    /// Bytes stored without a gap from the start: parts 1, 2, ... up to the first missing one.
    pub fn contiguous_len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Part `number` came or went: the ends from it on are recomputed (only those: a part
    /// added at the end of the run costs one lookup, or a few if it closes a gap).
    fn changed_from(&mut self, number: u64) {
        let kept = usize::try_from(number.saturating_sub(1)).unwrap_or(usize::MAX);
        if kept > self.ends.len() {
            // Past a gap: the run does not reach it.
            return;
        }
        self.ends.truncate(kept);
        let mut end = self.contiguous_len();
        while let Some(part) = self.parts.get(&(self.ends.len() as u64 + 1)) {
            match end.checked_add(part.len) {
                Some(next) => end = next,
                None => break,
            }
            self.ends.push(end);
        }
    }
}

impl std::ops::Deref for PartIndex {
    type Target = BTreeMap<u64, StoredPart>;

    fn deref(&self) -> &Self::Target {
        &self.parts
    }
}

impl FromIterator<(u64, StoredPart)> for PartIndex {
    fn from_iter<I: IntoIterator<Item = (u64, StoredPart)>>(iter: I) -> PartIndex {
        let mut index = PartIndex::new();
        for (number, part) in iter {
            index.insert(number, part);
        }
        index
    }
}

impl<const N: usize> From<[(u64, StoredPart); N]> for PartIndex {
    fn from(parts: [(u64, StoredPart); N]) -> PartIndex {
        parts.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u64, len: u64) -> (u64, StoredPart) {
        let digest = [number as u8; 32];
        (
            number,
            StoredPart {
                number,
                len,
                digest,
            },
        )
    }

    #[test]
    fn an_upload_is_complete_when_consecutive_parts_reach_the_end() {
        let both = PartIndex::from([part(1, 1000), part(2, 1500)]);
        assert_eq!(both.complete_count(2500), Some(2));
        assert_eq!(
            both.complete_count(1000),
            Some(1),
            "the first part to end there"
        );
        assert_eq!(both.complete_count(2000), None, "no part ends there");
        assert_eq!(both.complete_count(3000), None, "the parts end before it");
        let gap = PartIndex::from([part(1, 1000), part(3, 500)]);
        assert_eq!(gap.complete_count(1500), None);
    }

    #[test]
    fn an_empty_file_is_complete_with_its_one_empty_part() {
        assert_eq!(PartIndex::from([part(1, 0)]).complete_count(0), Some(1));
        assert_eq!(
            PartIndex::new().complete_count(0),
            Some(0),
            "or with none at all"
        );
        assert_eq!(PartIndex::new().complete_count(1), None);
        assert_eq!(PartIndex::from([part(2, 0)]).complete_count(0), None);
    }

    #[test]
    fn the_offset_stops_at_the_first_missing_part() {
        let parts = PartIndex::from([part(1, 10), part(2, 5), part(4, 7)]);
        assert_eq!(parts.contiguous_len(), 15);
        assert_eq!(PartIndex::new().contiguous_len(), 0);
    }

    #[test]
    fn the_run_follows_parts_arriving_in_any_order_and_going() {
        let mut parts = PartIndex::new();
        for number in [3, 5, 2, 4] {
            parts.insert(number, part(number, 10).1);
            assert_eq!(parts.contiguous_len(), 0, "no part 1 yet");
        }
        parts.insert(1, part(1, 10).1);
        assert_eq!(
            parts.contiguous_len(),
            50,
            "part 1 closes the gap to part 5"
        );
        assert_eq!(parts.complete_count(50), Some(5));
        parts.insert(2, part(2, 4).1);
        assert_eq!(
            parts.contiguous_len(),
            44,
            "a part replaced with another length"
        );
        assert_eq!(parts.complete_count(50), None);
        assert_eq!(parts.complete_count(44), Some(5));
        assert_eq!(parts.remove(&3).map(|p| p.len), Some(10));
        assert_eq!(parts.contiguous_len(), 14);
        assert_eq!(parts.remove(&3), None);
        assert_eq!(parts.remove(&5).map(|p| p.len), Some(10));
        assert_eq!(
            parts.contiguous_len(),
            14,
            "a part past the gap changes nothing"
        );
        parts.insert(3, part(3, 6).1);
        assert_eq!(parts.contiguous_len(), 30, "parts 1 to 4 again");
        assert_eq!(parts.len(), 4);
    }

    #[test]
    fn ends_past_the_largest_length_stop_the_run() {
        let parts = PartIndex::from([part(1, u64::MAX - 1), part(2, 1), part(3, 1)]);
        assert_eq!(parts.contiguous_len(), u64::MAX);
        assert_eq!(parts.complete_count(u64::MAX), Some(2));
        assert_eq!(parts.complete_count(1), None);
    }

    /// The walk the index replaces, for comparison.
    fn walked(parts: &PartIndex, length: u64) -> Option<u64> {
        if length == 0 && parts.is_empty() {
            return Some(0);
        }
        let mut offset = 0u64;
        for number in 1..=parts.len() as u64 {
            offset = offset.checked_add(parts.get(&number)?.len)?;
            if offset == length {
                return Some(number);
            }
            if offset > length {
                return None;
            }
        }
        None
    }

    #[test]
    fn it_answers_as_a_walk_over_the_parts_would() {
        // Pseudo-random inserts and removes of parts 1..=12 with lengths 0..=3.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let mut parts = PartIndex::new();
        for _ in 0..5_000 {
            let number = next(12) + 1;
            if next(3) == 0 {
                parts.remove(&number);
            } else {
                parts.insert(number, part(number, next(4)).1);
            }
            for length in 0..40 {
                assert_eq!(
                    parts.complete_count(length),
                    walked(&parts, length),
                    "{parts:?}"
                );
            }
        }
    }
}
