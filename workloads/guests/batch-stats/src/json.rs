//! `report.json`, written by hand: no serde in the guest, and a fixed layout so that the same
//! inputs always give the same bytes (replicas of a job are compared by output hash).

use std::fmt::Write;

use crate::stats::{Report, Stats};

/// The report as pretty-printed JSON with a trailing newline.
///
/// ```text
/// {
///   "version": 1,
///   "top": 10,
///   "documents": [ { "name": ..., <stats> }, ... ],
///   "totals": { "documents": 2, <stats> }
/// }
/// ```
///
/// where `<stats>` is `bytes`, `lines`, `words`, `unique_words`, `average_word_length` (four
/// decimals) and `top_words` (`[{"word": ..., "count": ...}, ...]`).
pub(crate) fn report(report: &Report, top: usize) -> String {
    let mut out = String::new();
    out.push_str("{\n  \"version\": 1,\n");
    let _ = writeln!(out, "  \"top\": {top},");
    out.push_str("  \"documents\": [");
    for (index, document) in report.documents.iter().enumerate() {
        out.push_str(if index == 0 { "\n" } else { ",\n" });
        out.push_str("    {\n");
        let _ = writeln!(out, "      \"name\": {},", string(&document.name));
        stats(&mut out, &document.stats, top, "      ");
        out.push_str("    }");
    }
    out.push_str(if report.documents.is_empty() { "],\n" } else { "\n  ],\n" });
    out.push_str("  \"totals\": {\n");
    let _ = writeln!(out, "    \"documents\": {},", report.documents.len());
    stats(&mut out, &report.totals, top, "    ");
    out.push_str("  }\n}\n");
    out
}

/// The fields of one `Stats`, one per line at `indent`, without the closing brace.
fn stats(out: &mut String, stats: &Stats, top: usize, indent: &str) {
    let _ = writeln!(out, "{indent}\"bytes\": {},", stats.bytes);
    let _ = writeln!(out, "{indent}\"lines\": {},", stats.lines);
    let _ = writeln!(out, "{indent}\"words\": {},", stats.words);
    let _ = writeln!(out, "{indent}\"unique_words\": {},", stats.unique_words());
    let _ = writeln!(out, "{indent}\"average_word_length\": {:.4},", stats.average_word_length());
    let _ = write!(out, "{indent}\"top_words\": [");
    for (index, (word, count)) in stats.top_words(top).into_iter().enumerate() {
        let separator = if index == 0 { "" } else { ", " };
        let _ = write!(out, "{separator}{{\"word\": {}, \"count\": {count}}}", string(word));
    }
    out.push_str("]\n");
}

/// A JSON string literal: quotes, backslashes and control characters escaped, everything else
/// (valid UTF-8 already) as is.
pub(crate) fn string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Document;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(string("plain"), "\"plain\"");
        assert_eq!(string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(string("line\nnext\ttab\r"), r#""line\nnext\ttab\r""#);
        assert_eq!(string("\u{1}\u{1f}\u{7f}"), "\"\\u0001\\u001f\u{7f}\"");
        assert_eq!(string("ünï €"), "\"ünï €\"");
    }

    #[test]
    fn report_layout_is_fixed() {
        let input = Report::new(vec![
            Document::analyse("a \"quoted\".txt".into(), b"Hello hello world\n"),
            Document::analyse("empty".into(), b""),
        ]);
        let expected = r#"{
  "version": 1,
  "top": 2,
  "documents": [
    {
      "name": "a \"quoted\".txt",
      "bytes": 18,
      "lines": 1,
      "words": 3,
      "unique_words": 2,
      "average_word_length": 5.0000,
      "top_words": [{"word": "hello", "count": 2}, {"word": "world", "count": 1}]
    },
    {
      "name": "empty",
      "bytes": 0,
      "lines": 0,
      "words": 0,
      "unique_words": 0,
      "average_word_length": 0.0000,
      "top_words": []
    }
  ],
  "totals": {
    "documents": 2,
    "bytes": 18,
    "lines": 1,
    "words": 3,
    "unique_words": 2,
    "average_word_length": 5.0000,
    "top_words": [{"word": "hello", "count": 2}, {"word": "world", "count": 1}]
  }
}
"#;
        assert_eq!(report(&input, 2), expected);
    }

    #[test]
    fn no_documents_is_still_valid_json() {
        let out = report(&Report::new(vec![]), 10);
        assert!(out.contains("\"documents\": [],\n"), "{out}");
        assert!(out.contains("\"top_words\": []"), "{out}");
    }
}
