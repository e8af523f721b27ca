//! Counting: per-document statistics and their totals.
//!
//! Word counts live in `BTreeMap`s: ordered, so nothing depends on hashing (whose seeds would
//! need randomness from the sandbox) and every output is reproducible.

use std::cmp::Reverse;
use std::collections::BTreeMap;

/// Statistics of one document, or of all of them together.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Stats {
    pub(crate) bytes: u64,
    pub(crate) lines: u64,
    pub(crate) words: u64,
    /// Characters in all words, after lowercasing.
    pub(crate) word_chars: u64,
    /// Occurrences of each lowercased word.
    pub(crate) counts: BTreeMap<String, u64>,
}

impl Stats {
    pub(crate) fn unique_words(&self) -> usize {
        self.counts.len()
    }

    /// Mean characters per word; 0 when there are no words.
    pub(crate) fn average_word_length(&self) -> f64 {
        if self.words == 0 {
            0.0
        } else {
            self.word_chars as f64 / self.words as f64
        }
    }

    /// The `n` most frequent words, most frequent first, ties in alphabetical order.
    pub(crate) fn top_words(&self, n: usize) -> Vec<(&str, u64)> {
        let mut words: Vec<(&str, u64)> =
            self.counts.iter().map(|(word, &count)| (word.as_str(), count)).collect();
        // Already alphabetical (BTreeMap order), and sort_by_key is stable.
        words.sort_by_key(|&(_, count)| Reverse(count));
        words.truncate(n);
        words
    }

    fn add(&mut self, other: &Self) {
        self.bytes += other.bytes;
        self.lines += other.lines;
        self.words += other.words;
        self.word_chars += other.word_chars;
        for (word, count) in &other.counts {
            match self.counts.get_mut(word) {
                Some(total) => *total += count,
                None => {
                    self.counts.insert(word.clone(), *count);
                }
            }
        }
    }
}

/// One input file and its statistics.
#[derive(Debug, PartialEq)]
pub(crate) struct Document {
    pub(crate) name: String,
    pub(crate) stats: Stats,
}

impl Document {
    /// Counts `bytes`, read as UTF-8 with invalid sequences replaced.
    pub(crate) fn analyse(name: String, bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let mut stats =
            Stats { bytes: bytes.len() as u64, lines: count_lines(bytes), ..Stats::default() };
        let mut word = String::new();
        // A trailing non-alphanumeric sentinel flushes the last word.
        for c in text.chars().chain(std::iter::once(' ')) {
            if c.is_alphanumeric() {
                word.extend(c.to_lowercase());
                continue;
            }
            if word.is_empty() {
                continue;
            }
            stats.words += 1;
            stats.word_chars += word.chars().count() as u64;
            match stats.counts.get_mut(&word) {
                Some(count) => *count += 1,
                None => {
                    stats.counts.insert(word.clone(), 1);
                }
            }
            word.clear();
        }
        Self { name, stats }
    }
}

/// Newline-terminated lines, plus a last line without a newline: `""` has 0 lines, `"a"`
/// and `"a\n"` have 1, `"a\nb"` has 2.
fn count_lines(bytes: &[u8]) -> u64 {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    let unterminated = bytes.last().is_some_and(|&b| b != b'\n');
    newlines + u64::from(unterminated)
}

/// All documents, in input order, and their totals.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) documents: Vec<Document>,
    pub(crate) totals: Stats,
}

impl Report {
    pub(crate) fn new(documents: Vec<Document>) -> Self {
        let mut totals = Stats::default();
        for document in &documents {
            totals.add(&document.stats);
        }
        Self { documents, totals }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(text: &str) -> Stats {
        Document::analyse("t".into(), text.as_bytes()).stats
    }

    #[test]
    fn counts_words_lines_and_bytes() {
        let s = stats("Hello, world!\nhello again; WORLD-wide\n");
        assert_eq!(s.bytes, 38);
        assert_eq!(s.lines, 2);
        assert_eq!(s.words, 6);
        assert_eq!(s.unique_words(), 4);
        assert_eq!(s.top_words(2), vec![("hello", 2), ("world", 2)]);
        assert_eq!(s.top_words(10), vec![("hello", 2), ("world", 2), ("again", 1), ("wide", 1)]);
        // hello world hello again world wide: 5 + 5 + 5 + 5 + 5 + 4 characters.
        assert_eq!(s.word_chars, 29);
    }

    #[test]
    fn lines_follow_the_documented_rule() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a"), 1);
        assert_eq!(count_lines(b"a\n"), 1);
        assert_eq!(count_lines(b"a\nb"), 2);
        assert_eq!(count_lines(b"\n\n"), 2);
    }

    #[test]
    fn words_are_unicode_alphanumeric_runs_lowercased() {
        let s = stats("Straße STRASSE 42nd x_y Ünïcödé ünïcödé");
        assert_eq!(s.words, 7);
        assert_eq!(s.counts.get("straße"), Some(&1));
        assert_eq!(s.counts.get("strasse"), Some(&1));
        assert_eq!(s.counts.get("42nd"), Some(&1));
        assert_eq!(s.counts.get("x"), Some(&1));
        assert_eq!(s.counts.get("ünïcödé"), Some(&2));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let s = Document::analyse("bin".into(), b"ok\xff\xfeok").stats;
        assert_eq!(s.bytes, 6);
        assert_eq!(s.words, 2);
        assert_eq!(s.counts.get("ok"), Some(&2));
    }

    #[test]
    fn empty_document_has_zero_average() {
        let s = stats("  ... \n");
        assert_eq!((s.words, s.lines, s.unique_words()), (0, 1, 0));
        assert_eq!(s.average_word_length(), 0.0);
    }

    #[test]
    fn totals_merge_vocabularies() {
        let report = Report::new(vec![
            Document::analyse("a".into(), b"one two two"),
            Document::analyse("b".into(), b"two three\n"),
        ]);
        let t = &report.totals;
        assert_eq!((t.bytes, t.lines, t.words, t.unique_words()), (21, 2, 5, 3));
        assert_eq!(t.top_words(1), vec![("two", 3)]);
    }
}
