//! A small dictionary-based spell checker: unknown words within one edit (deletion,
//! insertion, substitution, transposition) of a dictionary word are corrected.

use std::collections::BTreeSet;

/// The dictionary shipped with the demo (280 common English words).
pub const DEFAULT_DICTIONARY: &str = include_str!("../data/dictionary.txt");

/// A set of known words.
#[derive(Debug, Clone)]
pub struct Dictionary {
    words: BTreeSet<String>,
}

/// The outcome of checking one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The text with corrections applied.
    pub corrected: String,
    /// How many words were corrected.
    pub corrections: u32,
    /// Unknown words with no candidate within one edit.
    pub unknown: u32,
}

impl Dictionary {
    /// One word per line; blank lines ignored.
    pub fn parse(list: &str) -> Self {
        Self {
            words: list
                .lines()
                .map(|l| l.trim().to_lowercase())
                .filter(|l| !l.is_empty())
                .collect(),
        }
    }

    /// Whether `word` (any case) is known.
    pub fn contains(&self, word: &str) -> bool {
        self.words.contains(&word.to_lowercase())
    }

    /// The first known word one edit away from `word`, if any.
    pub fn suggest(&self, word: &str) -> Option<String> {
        let lower = word.to_lowercase();
        let chars: Vec<char> = lower.chars().collect();
        let mut candidates = BTreeSet::new();
        for i in 0..chars.len() {
            let mut deleted = chars.clone();
            deleted.remove(i);
            candidates.insert(deleted.iter().collect::<String>());
            if i + 1 < chars.len() {
                let mut swapped = chars.clone();
                swapped.swap(i, i + 1);
                candidates.insert(swapped.iter().collect::<String>());
            }
        }
        for i in 0..=chars.len() {
            for c in 'a'..='z' {
                let mut inserted = chars.clone();
                inserted.insert(i, c);
                candidates.insert(inserted.iter().collect::<String>());
                if i < chars.len() {
                    let mut replaced = chars.clone();
                    replaced[i] = c;
                    candidates.insert(replaced.iter().collect::<String>());
                }
            }
        }
        candidates
            .into_iter()
            .find(|c| c != &lower && self.words.contains(c))
    }

    /// Checks and corrects `text`, keeping punctuation, spacing and capitalization.
    pub fn check(&self, text: &str) -> Checked {
        let mut corrected = String::with_capacity(text.len());
        let (mut corrections, mut unknown) = (0, 0);
        let mut word = String::new();
        let mut flush = |word: &mut String, out: &mut String| {
            if word.is_empty() {
                return;
            }
            if self.contains(word) {
                out.push_str(word);
            } else if let Some(fix) = self.suggest(word) {
                corrections += 1;
                out.push_str(&match_case(word, &fix));
            } else {
                unknown += 1;
                out.push_str(word);
            }
            word.clear();
        };
        for ch in text.chars() {
            if ch.is_alphabetic() {
                word.push(ch);
            } else {
                flush(&mut word, &mut corrected);
                corrected.push(ch);
            }
        }
        flush(&mut word, &mut corrected);
        Checked {
            corrected,
            corrections,
            unknown,
        }
    }
}

fn match_case(original: &str, fix: &str) -> String {
    if original.chars().next().is_some_and(char::is_uppercase) {
        let mut chars = fix.chars();
        chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    } else {
        fix.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrects_one_edit_typos_and_keeps_shape() {
        let d = Dictionary::parse("the\nteacher\nwrite\nschool\n");
        let c = d.check("Teh teacher wrtie in the schol, the end!");
        assert_eq!(c.corrected, "The teacher write in the school, the end!");
        assert_eq!(c.corrections, 3);
        assert_eq!(c.unknown, 2); // "in", "end" are not in this tiny dictionary
    }

    #[test]
    fn shipped_dictionary_is_loaded() {
        let d = Dictionary::parse(DEFAULT_DICTIONARY);
        assert!(d.contains("Teacher"));
        assert_eq!(d.suggest("techer").as_deref(), Some("teacher"));
    }
}
