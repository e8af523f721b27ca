//! `batch-stats`: word statistics over the documents of a batch job.
//!
//! The demo batch workload of aimatrix, built for `wasm32-wasip1` and run in a node's sandbox
//! (it also runs natively, which is how its tests run).
//!
//! ```text
//! batch-stats [--inputs DIR] [--outputs DIR] [--top N]
//! ```
//!
//! - Reads every regular file in `--inputs` (default `/job/inputs`; symlinks are followed,
//!   subdirectories skipped), in byte order of the file names, as UTF-8 with invalid
//!   sequences replaced by U+FFFD.
//! - Per document and in total it counts bytes, lines (newline-terminated lines, plus a final
//!   unterminated one), words (maximal runs of alphanumeric characters, lowercased), unique
//!   words, the `--top` (default 10) most frequent words (ties in alphabetical order) and the
//!   average word length in characters.
//! - Writes `report.json` to `--outputs` (default `/job/outputs`, created if missing): the same
//!   inputs always give the same bytes.
//! - Prints one line to stdout: `3 documents, 1234 words, 456 unique`.
//!
//! Exit status: 0 success; 1 an input or output could not be read or written (the message is
//! on stderr); 2 bad arguments.

mod json;
mod stats;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use stats::Document;

const USAGE: &str = "\
usage: batch-stats [--inputs DIR] [--outputs DIR] [--top N]

  --inputs DIR    directory of documents to read (default /job/inputs)
  --outputs DIR   directory to write report.json to (default /job/outputs)
  --top N         most frequent words to list per document and in total (default 10)
";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
struct Args {
    inputs: PathBuf,
    outputs: PathBuf,
    top: usize,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("batch-stats: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("batch-stats: {message}");
            ExitCode::from(1)
        }
    }
}

/// Parses `--flag VALUE` and `--flag=VALUE`; `Ok(None)` means `--help` was asked for.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        inputs: PathBuf::from("/job/inputs"),
        outputs: PathBuf::from("/job/outputs"),
        top: 10,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(arg) = arg.to_str().map(str::to_owned) else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(OsString::from(value))),
            _ => (arg.as_str(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        if !matches!(flag, "--inputs" | "--outputs" | "--top") {
            return Err(format!("unexpected argument '{arg}'"));
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            return Err(format!("{flag} needs a value"));
        };
        match flag {
            "--inputs" => parsed.inputs = PathBuf::from(value),
            "--outputs" => parsed.outputs = PathBuf::from(value),
            _ => {
                let text = value.to_string_lossy();
                parsed.top = text
                    .parse()
                    .map_err(|_| format!("--top must be a whole number of words, got '{text}'"))?;
            }
        }
    }
    Ok(Some(parsed))
}

/// Reads the inputs, writes the report, and returns the summary line.
fn run(args: &Args) -> Result<String, String> {
    let documents = read_documents(&args.inputs)?;
    let report = stats::Report::new(documents);
    let totals = &report.totals;
    let summary = format!(
        "{} documents, {} words, {} unique",
        report.documents.len(),
        totals.words,
        totals.unique_words()
    );
    fs::create_dir_all(&args.outputs).map_err(|err| {
        format!("cannot create outputs directory {}: {err}", args.outputs.display())
    })?;
    let path = args.outputs.join("report.json");
    fs::write(&path, json::report(&report, args.top))
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok(summary)
}

/// Analyses every regular file in `dir`, in byte order of their names.
fn read_documents(dir: &Path) -> Result<Vec<Document>, String> {
    let cannot_read =
        |err: std::io::Error| format!("cannot read inputs directory {}: {err}", dir.display());
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(cannot_read)? {
        let entry = entry.map_err(cannot_read)?;
        // fs::metadata follows symlinks: a link to a file counts, a directory does not.
        let path = entry.path();
        let metadata =
            fs::metadata(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        if metadata.is_file() {
            names.push(entry.file_name());
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let bytes =
                fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            Ok(Document::analyse(name.to_string_lossy().into_owned(), &bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_and_flags() {
        let defaults = parse(&[]).unwrap().unwrap();
        assert_eq!(defaults.inputs, PathBuf::from("/job/inputs"));
        assert_eq!(defaults.outputs, PathBuf::from("/job/outputs"));
        assert_eq!(defaults.top, 10);

        let args = parse(&["--inputs", "in", "--outputs=out", "--top", "3"]).unwrap().unwrap();
        assert_eq!(args, Args { inputs: "in".into(), outputs: "out".into(), top: 3 });
        assert_eq!(parse(&["--help"]), Ok(None));
    }

    #[test]
    fn bad_arguments_are_explained() {
        assert!(parse(&["--top"]).unwrap_err().contains("--top needs a value"));
        assert!(parse(&["--top", "many"]).unwrap_err().contains("got 'many'"));
        assert!(parse(&["--top", "-1"]).is_err());
        assert!(parse(&["extra"]).unwrap_err().contains("unexpected argument 'extra'"));
        assert!(parse(&["--verbose"]).is_err());
    }
}
