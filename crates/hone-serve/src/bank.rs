//! Book-keeping of the model's adapter bank slots: which adapter name occupies which slot, and
//! how many running requests use it. An adapter unloaded by name stops being found at once, but
//! its slot is only emptied (and reused) when its last running request ends, so a request keeps
//! its adapter from first token to last.

/// One bank slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Free,
    Loaded {
        name: String,
        users: usize,
    },
    /// Unloaded by name; freed when its last running request ends.
    Retiring {
        users: usize,
    },
}

/// The slots of the bank.
#[derive(Debug, Default)]
pub(crate) struct Bank {
    slots: Vec<Slot>,
}

impl Bank {
    /// The slot holding adapter `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| matches!(s, Slot::Loaded { name: n, .. } if n == name))
    }

    /// Slots holding weights (loaded or retiring).
    pub fn occupied(&self) -> usize {
        self.slots.iter().filter(|s| **s != Slot::Free).count()
    }

    /// The slot a new adapter would go to.
    pub fn next_free(&self) -> usize {
        self.slots
            .iter()
            .position(|s| *s == Slot::Free)
            .unwrap_or(self.slots.len())
    }

    /// Records that `name` now occupies `slot` (from [`Self::next_free`]).
    pub fn occupy(&mut self, slot: usize, name: &str) {
        if slot >= self.slots.len() {
            self.slots.resize(slot + 1, Slot::Free);
        }
        self.slots[slot] = Slot::Loaded {
            name: name.to_string(),
            users: 0,
        };
    }

    /// A request starts using `name`: its slot.
    pub fn acquire(&mut self, name: &str) -> Option<usize> {
        let slot = self.find(name)?;
        if let Slot::Loaded { users, .. } = &mut self.slots[slot] {
            *users += 1;
        }
        Some(slot)
    }

    /// A request using `slot` ended. Returns true when the slot must be emptied now.
    #[must_use]
    pub fn release(&mut self, slot: usize) -> bool {
        match self.slots.get_mut(slot) {
            Some(Slot::Loaded { users, .. }) => {
                *users = users.saturating_sub(1);
                false
            }
            Some(Slot::Retiring { users }) => {
                *users = users.saturating_sub(1);
                self.free_if_unused(slot)
            }
            _ => false,
        }
    }

    /// Unloads `name`: `Some((slot, empty_now))`, `None` if it is not loaded.
    pub fn retire(&mut self, name: &str) -> Option<(usize, bool)> {
        let slot = self.find(name)?;
        if let Slot::Loaded { users, .. } = self.slots[slot] {
            self.slots[slot] = Slot::Retiring { users };
        }
        Some((slot, self.free_if_unused(slot)))
    }

    fn free_if_unused(&mut self, slot: usize) -> bool {
        if self.slots[slot] == (Slot::Retiring { users: 0 }) {
            self.slots[slot] = Slot::Free;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_slot_is_reused_only_after_its_last_request() {
        let mut bank = Bank::default();
        bank.occupy(bank.next_free(), "a");
        bank.occupy(bank.next_free(), "b");
        assert_eq!((bank.find("a"), bank.find("b")), (Some(0), Some(1)));
        let slot = bank.acquire("a").unwrap();
        assert_eq!(bank.retire("a"), Some((0, false)));
        assert_eq!(bank.find("a"), None);
        assert_eq!(bank.acquire("a"), None);
        assert_eq!(bank.next_free(), 2, "slot 0 still holds a's weights");
        assert_eq!(bank.occupied(), 2);
        assert!(bank.release(slot), "the last user frees it");
        assert_eq!(bank.next_free(), 0);
        assert_eq!(bank.retire("b"), Some((1, true)));
        assert_eq!(bank.retire("b"), None);
        assert_eq!(bank.occupied(), 0);
    }
}
