//! `rivulet write`: bulk import of line protocol, streamed in chunks.
//!
//! Atomic by default: a first pass checks the whole input (syntax and types) and writes nothing
//! if any line is bad; the second pass writes it chunk by chunk. `--accept-partial` skips the
//! check, writes the good lines and reports the bad ones.

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rivulet::{
    Config, Db, Durability, ImportCheck, LineError, Precision, WriteError, WriteOptions,
};

use super::{CliResult, DataDirArgs};

/// Lines are handed to the database in chunks of about this many bytes.
const CHUNK_BYTES: usize = 4 << 20;
/// At most this many bad lines are printed.
const MAX_PRINTED_ERRORS: usize = 20;

#[derive(Debug, clap::Args)]
pub(crate) struct WriteArgs {
    #[command(flatten)]
    dir: DataDirArgs,
    /// Timestamp precision of the input.
    #[arg(long, default_value = "ns")]
    precision: Precision,
    /// Write the good lines and report the bad ones instead of writing nothing.
    #[arg(long)]
    accept_partial: bool,
    /// WAL durability: sync, none or interval:<ms>.
    #[arg(long, env = "RIVULET_DURABILITY", default_value = "sync")]
    durability: Durability,
    /// The line protocol file, or `-` for standard input (read into memory when atomic).
    file: PathBuf,
}

/// The input, read in chunks that end at a line boundary.
struct Chunks {
    reader: Box<dyn Read>,
    carry: Vec<u8>,
    eof: bool,
    /// 1-based line number of the next chunk's first line.
    next_line: usize,
}

struct Chunk {
    text: String,
    first_line: usize,
    bytes: usize,
}

impl Chunks {
    fn new(reader: Box<dyn Read>) -> Chunks {
        Chunks {
            reader,
            carry: Vec::new(),
            eof: false,
            next_line: 1,
        }
    }

    fn next_chunk(&mut self) -> Result<Option<Chunk>, Box<dyn std::error::Error>> {
        let mut buf = std::mem::take(&mut self.carry);
        while !self.eof && buf.len() < CHUNK_BYTES {
            let start = buf.len();
            buf.resize(start + CHUNK_BYTES, 0);
            let n = self.reader.read(&mut buf[start..])?;
            buf.truncate(start + n);
            if n == 0 {
                self.eof = true;
            }
        }
        if buf.is_empty() {
            return Ok(None);
        }
        if !self.eof {
            // Cut after the last newline; the rest starts the next chunk. A quoted string that
            // spans the cut is handled by the caller carrying the incomplete line over.
            match buf.iter().rposition(|&b| b == b'\n') {
                Some(p) => self.carry = buf.split_off(p + 1),
                None => {
                    // One line longer than a chunk: keep reading until it ends.
                    self.carry = buf;
                    let more = self.next_chunk()?;
                    return Ok(more);
                }
            }
        }
        let bytes = buf.len();
        let first_line = self.next_line;
        let text = String::from_utf8(buf).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            let line = first_line + bytes[..at].iter().filter(|&&b| b == b'\n').count();
            format!("line {line}: the input is not valid UTF-8")
        })?;
        self.next_line += text.bytes().filter(|&b| b == b'\n').count();
        Ok(Some(Chunk {
            text,
            first_line,
            bytes,
        }))
    }

    /// Puts the tail of a chunk (an incomplete line) back in front of the unread input.
    fn unread(&mut self, tail: &str) {
        let mut carry = tail.as_bytes().to_vec();
        carry.append(&mut self.carry);
        self.carry = carry;
        self.eof = false;
        self.next_line -= tail.bytes().filter(|&b| b == b'\n').count();
    }
}

/// An input and its length when known.
type Input = (Box<dyn Read>, Option<u64>);

/// Opens the input; `stdin` holds standard input when it had to be read into memory.
fn open_input(
    path: &PathBuf,
    stdin: Option<&Arc<[u8]>>,
) -> Result<Input, Box<dyn std::error::Error>> {
    if path.as_os_str() == "-" {
        return Ok(match stdin {
            Some(data) => (
                Box::new(std::io::Cursor::new(data.clone())),
                Some(data.len() as u64),
            ),
            None => (Box::new(std::io::stdin()), None),
        });
    }
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = file.metadata().ok().map(|m| m.len());
    Ok((
        Box::new(std::io::BufReader::with_capacity(1 << 20, file)),
        len,
    ))
}

fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let template = format!(
        "{what} [{{elapsed_precise}}] {{bar:30}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} {{msg}}"
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

fn report_errors(errors: &[LineError], total: usize) -> String {
    let mut s = String::new();
    for e in errors.iter().take(MAX_PRINTED_ERRORS) {
        s.push_str(&format!("\n  {e}"));
    }
    if total > MAX_PRINTED_ERRORS {
        s.push_str(&format!("\n  … and {} more", total - MAX_PRINTED_ERRORS));
    }
    s
}

pub(crate) fn run(args: WriteArgs) -> CliResult {
    let config = Config {
        durability: args.durability,
        ..args.dir.config()
    };
    let db = Db::open_with(config)?;
    let options = WriteOptions {
        precision: args.precision,
        accept_partial: args.accept_partial,
        first_line: 1,
    };
    let atomic = !args.accept_partial;
    // Two passes read the input twice: an atomic import keeps standard input in memory.
    let stdin: Option<Arc<[u8]>> = if atomic && args.file.as_os_str() == "-" {
        let mut all = Vec::new();
        std::io::stdin().lock().read_to_end(&mut all)?;
        Some(all.into())
    } else {
        None
    };
    if atomic {
        let (bad, errors) = check_pass(&db, &args, options, stdin.as_ref())?;
        if bad > 0 {
            db.close()?;
            return Err(format!(
                "{} bad line(s) in {}; nothing was written:{}",
                bad,
                args.file.display(),
                report_errors(&errors, bad)
            )
            .into());
        }
    }
    let started = Instant::now();
    let written = write_pass(&db, &args, options, stdin.as_ref())?;
    db.close()?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let Written {
        rows,
        bytes,
        last_seq,
        rejected,
        rejected_total,
    } = written;
    println!(
        "wrote {rows} rows ({:.1} MB) into database '{}' in {secs:.2} s: {:.0} rows/s, {:.1} MB/s; last sequence {last_seq}",
        bytes as f64 / 1e6,
        args.dir.db,
        rows as f64 / secs,
        bytes as f64 / 1e6 / secs,
    );
    if rejected_total > 0 {
        return Err(format!(
            "{rejected_total} bad line(s) were skipped:{}",
            report_errors(&rejected, rejected_total)
        )
        .into());
    }
    Ok(())
}

/// The first pass of an atomic import: checks every line without writing; returns how many
/// are bad and the first of them.
fn check_pass(
    db: &Db,
    args: &WriteArgs,
    options: WriteOptions,
    stdin: Option<&Arc<[u8]>>,
) -> Result<(usize, Vec<LineError>), Box<dyn std::error::Error>> {
    let (reader, total) = open_input(&args.file, stdin)?;
    let bar = progress(total, "checking");
    let mut chunks = Chunks::new(reader);
    let mut state = ImportCheck::default();
    let mut errors = Vec::new();
    let mut bad = 0usize;
    while let Some(chunk) = chunks.next_chunk()? {
        let opts = WriteOptions {
            first_line: chunk.first_line,
            ..options
        };
        let mut found = db.check_lines(&args.dir.db, &chunk.text, &opts, &mut state)?;
        if let Some(tail) = incomplete_tail(&chunk, &found, chunks.eof) {
            found.retain(|e| e.line < tail.1);
            chunks.unread(&chunk.text[tail.0..]);
            bar.inc((tail.0) as u64);
        } else {
            bar.inc(chunk.bytes as u64);
        }
        bad += found.len();
        errors.extend(
            found
                .into_iter()
                .take(MAX_PRINTED_ERRORS.saturating_sub(errors.len())),
        );
    }
    bar.finish_and_clear();
    Ok((bad, errors))
}

/// What the write pass did.
struct Written {
    rows: usize,
    bytes: u64,
    last_seq: u64,
    rejected: Vec<LineError>,
    rejected_total: usize,
}

/// Writes the input chunk by chunk (a chunk that ends inside a quoted string is written up to
/// that line; the rest is carried over to the next chunk).
fn write_pass(
    db: &Db,
    args: &WriteArgs,
    options: WriteOptions,
    stdin: Option<&Arc<[u8]>>,
) -> Result<Written, Box<dyn std::error::Error>> {
    let (reader, total) = open_input(&args.file, stdin)?;
    let bar = progress(total, "writing ");
    let mut chunks = Chunks::new(reader);
    let mut out = Written {
        rows: 0,
        bytes: 0,
        last_seq: db.last_seq(),
        rejected: Vec::new(),
        rejected_total: 0,
    };
    while let Some(chunk) = chunks.next_chunk()? {
        let opts = WriteOptions {
            first_line: chunk.first_line,
            ..options
        };
        let rows = out.rows;
        let fail = |e: rivulet::Error| {
            format!(
                "writing lines from line {} failed after {rows} rows were written: {e}",
                chunk.first_line
            )
        };
        let mut text = chunk.text.as_str();
        let receipt = match db.write_lines_with(&args.dir.db, text, &opts) {
            Ok(mut receipt) => {
                if let Some((off, line)) = incomplete_tail(&chunk, &receipt.rejected, chunks.eof) {
                    receipt.rejected.retain(|e| e.line < line);
                    receipt.rejected_total -= 1;
                    chunks.unread(&chunk.text[off..]);
                    text = &chunk.text[..off];
                }
                receipt
            }
            Err(rivulet::Error::Write(WriteError::Rejected { errors, .. }))
                if incomplete_tail(&chunk, &errors, chunks.eof).is_some() =>
            {
                let (off, _) = incomplete_tail(&chunk, &errors, chunks.eof).unwrap_or((0, 0));
                chunks.unread(&chunk.text[off..]);
                text = &chunk.text[..off];
                db.write_lines_with(&args.dir.db, text, &opts)
                    .map_err(fail)?
            }
            Err(e) => return Err(fail(e).into()),
        };
        out.rows += receipt.rows;
        out.bytes += text.len() as u64;
        out.last_seq = receipt.seq;
        out.rejected_total += receipt.rejected_total;
        let room = MAX_PRINTED_ERRORS.saturating_sub(out.rejected.len());
        out.rejected.extend(receipt.rejected.into_iter().take(room));
        bar.inc(text.len() as u64);
        bar.set_message(format!("{} rows", out.rows));
    }
    bar.finish_and_clear();
    Ok(out)
}

/// When a checked chunk ended inside a quoted string and more input follows: the byte offset
/// and line number where the incomplete line starts.
fn incomplete_tail(chunk: &Chunk, errors: &[LineError], eof: bool) -> Option<(usize, usize)> {
    if eof {
        return None;
    }
    let last = errors.last()?;
    if !last.reason.starts_with("unterminated string") {
        return None;
    }
    line_offset(&chunk.text, chunk.first_line, last.line).map(|off| (off, last.line))
}

/// Byte offset of line `line` in `text` whose first line is `first_line`.
fn line_offset(text: &str, first_line: usize, line: usize) -> Option<usize> {
    if line == first_line {
        return Some(0);
    }
    text.match_indices('\n')
        .nth(line.checked_sub(first_line + 1)?)
        .map(|(i, _)| i + 1)
}
