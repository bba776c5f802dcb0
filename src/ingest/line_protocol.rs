//! InfluxDB line protocol parser.
//!
//! This is the ingest hot path, so it never allocates per byte or per line: a whole request is
//! parsed into three flat vectors (lines, tags, fields) whose tokens borrow the input. Escaped
//! names are unescaped lazily, only when a consumer needs the text ([`Token::unescape_into`]).
//!
//! Grammar (the InfluxDB spec): `measurement[,tag=value…] field=value[,field=value…] [timestamp]`.
//! - measurement: `\,` and `\ ` are escapes;
//! - tag keys, tag values, field keys: `\,`, `\=` and `\ ` are escapes;
//! - string field values are double quoted; `\"` and `\\` are escapes, and a quoted string may span
//!   lines;
//! - any other backslash is a literal backslash;
//! - floats (`1`, `-1.5e3`), integers (`1i`), unsigned integers (`1u`), booleans
//!   (`t T true True TRUE f F false False FALSE`);
//! - an optional integer timestamp in the request's precision;
//! - `#` comments, blank lines, CRLF line ends and a missing final newline are accepted.
//!
//! Every error names the line (1-based), the column (1-based, in bytes) and the reason. After an
//! error the parser skips to the next line, so one request reports all its bad lines.

use super::Refusal;
use std::fmt;
use std::ops::Range;

/// At most this many bad lines are listed per parse (all are counted).
pub const MAX_LISTED_ERRORS: usize = 1000;

/// The unit of a line protocol timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Nanoseconds (the default).
    #[default]
    Nanosecond,
    /// Microseconds.
    Microsecond,
    /// Milliseconds.
    Millisecond,
    /// Seconds.
    Second,
    /// Guessed per timestamp from its magnitude, as InfluxDB 3's `precision=auto`: below 5e9
    /// seconds, below 5e12 milliseconds, below 5e15 microseconds, else nanoseconds.
    Auto,
}

impl Precision {
    /// How many nanoseconds one unit is.
    pub fn nanos_per_unit(self) -> i64 {
        match self {
            Precision::Nanosecond | Precision::Auto => 1,
            Precision::Microsecond => 1_000,
            Precision::Millisecond => 1_000_000,
            Precision::Second => 1_000_000_000,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// Accepts the spellings of InfluxDB 1.x (`n`, `u`, `ms`, `s`), 2.x (`ns`, `us`, `ms`, `s`)
    /// and 3.x (`nanosecond`, `microsecond`, `millisecond`, `second`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ns" | "n" | "nanosecond" | "nanoseconds" => Ok(Precision::Nanosecond),
            "us" | "u" | "µs" | "microsecond" | "microseconds" => Ok(Precision::Microsecond),
            "ms" | "millisecond" | "milliseconds" => Ok(Precision::Millisecond),
            "s" | "second" | "seconds" => Ok(Precision::Second),
            "auto" => Ok(Precision::Auto),
            other => Err(format!(
                "unknown precision '{other}': expected ns, us, ms, s or auto"
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Nanosecond => "ns",
            Precision::Microsecond => "us",
            Precision::Millisecond => "ms",
            Precision::Second => "s",
            Precision::Auto => "auto",
        })
    }
}

/// A name or string value as it stands in the input, with a flag telling whether it holds escapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    raw: &'a str,
    escaped: bool,
    kind: TokenKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Measurement,
    Name,
    QuotedString,
}

impl<'a> Token<'a> {
    /// The text as written (escapes included).
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The unescaped text when it has no escapes: the common case, borrowed from the input.
    pub fn plain(&self) -> Option<&'a str> {
        (!self.escaped).then_some(self.raw)
    }

    /// Appends the unescaped text to `out`.
    pub fn unescape_into(&self, out: &mut String) {
        if !self.escaped {
            out.push_str(self.raw);
            return;
        }
        let mut chars = self.raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\'
                && let Some(&next) = chars.peek()
                && self.is_escapable(next)
            {
                out.push(next);
                chars.next();
                continue;
            }
            out.push(c);
        }
    }

    /// The unescaped text, allocating only when the token holds escapes.
    pub fn to_cow(&self) -> std::borrow::Cow<'a, str> {
        match self.plain() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => {
                let mut s = String::with_capacity(self.raw.len());
                self.unescape_into(&mut s);
                std::borrow::Cow::Owned(s)
            }
        }
    }

    fn is_escapable(&self, c: char) -> bool {
        match self.kind {
            TokenKind::Measurement => c == ',' || c == ' ',
            TokenKind::Name => c == ',' || c == ' ' || c == '=',
            TokenKind::QuotedString => c == '"' || c == '\\',
        }
    }
}

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_cow())
    }
}

/// A parsed field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    /// A float (no suffix).
    Float(f64),
    /// A signed integer (`i` suffix).
    Integer(i64),
    /// An unsigned integer (`u` suffix).
    UInteger(u64),
    /// A boolean.
    Boolean(bool),
    /// A double-quoted string.
    String(Token<'a>),
}

/// One parsed line. Tags and fields are ranges into [`ParsedLines`]' flat vectors.
#[derive(Debug, Clone)]
pub struct Line<'a> {
    /// 1-based line number of the line's first byte.
    pub line_no: usize,
    /// The measurement (table) name.
    pub measurement: Token<'a>,
    /// The tag set exactly as written (`,a=1,b=2`), a cheap identity for a series.
    pub raw_tags: &'a str,
    /// Timestamp in nanoseconds, already scaled by the precision; `None` = server time.
    pub timestamp: Option<i64>,
    tags: Range<u32>,
    fields: Range<u32>,
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// 1-based byte column within the line.
    pub column: usize,
    /// The reason.
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.reason
        )
    }
}

/// The result of parsing a request body: good lines plus one error per bad line.
#[derive(Debug, Default)]
pub struct ParsedLines<'a> {
    /// The lines that parsed, in input order.
    pub lines: Vec<Line<'a>>,
    tags: Vec<(Token<'a>, Token<'a>)>,
    fields: Vec<(Token<'a>, FieldValue<'a>)>,
    /// One entry per line that did not parse, in input order (at most 1000 are listed).
    pub errors: Vec<LineError>,
    /// How many lines did not parse.
    pub error_count: usize,
    /// The line number after the last line of the input.
    pub end_line: usize,
    /// When the input ended inside a quoted string, the byte offset where that line starts (a
    /// streaming reader carries that line over to the next chunk).
    pub incomplete_tail: Option<usize>,
}

impl<'a> ParsedLines<'a> {
    /// The tag pairs of `line`.
    pub fn tags(&self, line: &Line<'a>) -> &[(Token<'a>, Token<'a>)] {
        &self.tags[line.tags.start as usize..line.tags.end as usize]
    }

    /// The fields of `line`.
    pub fn fields(&self, line: &Line<'a>) -> &[(Token<'a>, FieldValue<'a>)] {
        &self.fields[line.fields.start as usize..line.fields.end as usize]
    }
}

/// Options for [`parse`].
#[derive(Debug, Clone, Copy)]
pub struct ParseOptions {
    /// Unit of the timestamps in the input.
    pub precision: Precision,
    /// Line number of the first line (for inputs that are chunks of a larger file).
    pub first_line: usize,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            precision: Precision::Nanosecond,
            first_line: 1,
        }
    }
}

/// Parses a whole line protocol request.
pub fn parse(input: &str, options: ParseOptions) -> ParsedLines<'_> {
    let mut parser = Parser {
        input,
        bytes: input.as_bytes(),
        pos: 0,
        line_no: options.first_line,
        line_start: 0,
        scale: options.precision.nanos_per_unit(),
        auto: options.precision == Precision::Auto,
        out: ParsedLines {
            lines: Vec::with_capacity(input.len() / 128 + 1),
            tags: Vec::with_capacity(input.len() / 16 + 1),
            fields: Vec::with_capacity(input.len() / 16 + 1),
            ..ParsedLines::default()
        },
    };
    parser.run();
    parser.out.end_line = parser.line_no;
    parser.out
}

struct Parser<'a> {
    input: &'a str,
    bytes: &'a [u8],
    pos: usize,
    line_no: usize,
    line_start: usize,
    scale: i64,
    auto: bool,
    out: ParsedLines<'a>,
}

/// An error at a byte offset; turned into a [`LineError`] with line and column.
struct Fail {
    at: usize,
    reason: String,
    /// The input ended inside a quoted string.
    unterminated: bool,
}

fn fail(at: usize, reason: impl Into<String>) -> Fail {
    Fail {
        at,
        reason: reason.into(),
        unterminated: false,
    }
}

/// Bytes that can end or change a token anywhere in a line; every other byte is plain text
/// that the scanners skip in a tight loop.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let special = [b',', b'=', b' ', b'\t', b'\\', b'\n', b'\r', b'"'];
    let mut i = 0;
    while i < special.len() {
        t[special[i] as usize] = true;
        i += 1;
    }
    t
};

#[inline]
fn is_eol(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

impl<'a> Parser<'a> {
    fn run(&mut self) {
        while self.pos < self.bytes.len() {
            self.line_start = self.pos;
            let line_no = self.line_no;
            let tags_len = self.out.tags.len();
            let fields_len = self.out.fields.len();
            match self.line() {
                Ok(()) => {}
                Err(f) => {
                    self.out.tags.truncate(tags_len);
                    self.out.fields.truncate(fields_len);
                    if f.unterminated {
                        self.out.incomplete_tail = Some(self.line_start);
                    }
                    // Column within the physical line the error is on (strings may span lines).
                    let before = &self.bytes[self.line_start..f.at.min(self.bytes.len())];
                    let newlines = before.iter().filter(|&&b| b == b'\n').count();
                    let col_start = before
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(self.line_start, |p| self.line_start + p + 1);
                    self.out.error_count += 1;
                    if self.out.errors.len() >= MAX_LISTED_ERRORS {
                        self.skip_to_next_line(f.at);
                        continue;
                    }
                    self.out.errors.push(LineError {
                        line: line_no + newlines,
                        column: f.at.saturating_sub(col_start) + 1,
                        reason: f.reason,
                    });
                    self.skip_to_next_line(f.at);
                }
            }
        }
    }

    /// Moves past the end of the line containing `at` (for error recovery).
    fn skip_to_next_line(&mut self, at: usize) {
        let mut p = self.pos.max(at).min(self.bytes.len());
        // Count the newlines consumed between the position reached and the recovery point.
        let consumed = &self.bytes[self.pos.min(p)..p];
        self.line_no += consumed.iter().filter(|&&b| b == b'\n').count();
        while p < self.bytes.len() && self.bytes[p] != b'\n' {
            p += 1;
        }
        if p < self.bytes.len() {
            p += 1;
            self.line_no += 1;
        }
        self.pos = p;
    }

    /// Consumes the end of a line (`\n`, `\r\n`, or the end of input).
    fn end_of_line(&mut self) -> Result<(), Fail> {
        match self.bytes.get(self.pos) {
            None => Ok(()),
            Some(b'\n') => {
                self.pos += 1;
                self.line_no += 1;
                Ok(())
            }
            Some(b'\r') if self.bytes.get(self.pos + 1) == Some(&b'\n') => {
                self.pos += 2;
                self.line_no += 1;
                Ok(())
            }
            Some(b'\r') if self.pos + 1 == self.bytes.len() => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(fail(self.pos, "unexpected text after timestamp")),
        }
    }

    /// Advances over plain bytes (see [`SPECIAL`]).
    #[inline]
    fn skip_plain(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            if SPECIAL[b as usize] {
                break;
            }
            self.pos += 1;
        }
    }

    fn skip_blanks(&mut self) {
        while let Some(b' ' | b'\t') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn line(&mut self) -> Result<(), Fail> {
        self.skip_blanks();
        match self.bytes.get(self.pos) {
            None => return Ok(()),
            Some(b'#') => {
                while self.pos < self.bytes.len() && self.bytes[self.pos] != b'\n' {
                    self.pos += 1;
                }
                return self.end_of_line();
            }
            Some(&b) if is_eol(b) => return self.end_of_line(),
            _ => {}
        }
        let line_no = self.line_no;
        let measurement = self.measurement()?;
        let tags_start = self.out.tags.len() as u32;
        let raw_tags_start = self.pos;
        while self.bytes.get(self.pos) == Some(&b',') {
            self.pos += 1;
            let key = self.name("tag key", true)?;
            let value = self.name("tag value", false)?;
            self.out.tags.push((key, value));
        }
        let raw_tags = &self.input[raw_tags_start..self.pos];
        let tags_end = self.out.tags.len() as u32;
        check_duplicates(&self.out.tags[tags_start as usize..], |t| t.0, "tag")
            .map_err(|m| fail(raw_tags_start, m))?;

        match self.bytes.get(self.pos) {
            Some(b' ' | b'\t') => self.skip_blanks(),
            None => return Err(fail(self.pos, "missing fields")),
            Some(&b) if is_eol(b) => return Err(fail(self.pos, "missing fields")),
            Some(_) => return Err(fail(self.pos, "expected a space before the fields")),
        }
        let fields_start = self.out.fields.len() as u32;
        let fields_at = self.pos;
        loop {
            match self.bytes.get(self.pos) {
                None => return Err(fail(self.pos, "missing fields")),
                Some(&b) if is_eol(b) => return Err(fail(self.pos, "missing fields")),
                _ => {}
            }
            let key = self.name("field key", true)?;
            let value = self.field_value(&key)?;
            self.out.fields.push((key, value));
            if self.bytes.get(self.pos) == Some(&b',') {
                self.pos += 1;
                continue;
            }
            break;
        }
        let fields_end = self.out.fields.len() as u32;
        check_duplicates(&self.out.fields[fields_start as usize..], |f| f.0, "field")
            .map_err(|m| fail(fields_at, m))?;

        let timestamp = match self.bytes.get(self.pos) {
            Some(b' ' | b'\t') => {
                self.skip_blanks();
                self.timestamp()?
            }
            None => None,
            Some(&b) if is_eol(b) => None,
            Some(_) => {
                return Err(fail(
                    self.pos,
                    "expected a space or the end of the line after the fields",
                ));
            }
        };
        self.skip_blanks();
        self.end_of_line()?;
        self.out.lines.push(Line {
            line_no,
            measurement,
            raw_tags,
            timestamp,
            tags: tags_start..tags_end,
            fields: fields_start..fields_end,
        });
        Ok(())
    }

    fn measurement(&mut self) -> Result<Token<'a>, Fail> {
        let start = self.pos;
        let mut escaped = false;
        loop {
            self.skip_plain();
            let Some(&b) = self.bytes.get(self.pos) else {
                break;
            };
            match b {
                b',' | b' ' | b'\t' => break,
                b'\\' if self.bytes.get(self.pos + 1).is_some_and(|&n| !is_eol(n)) => {
                    escaped = true;
                    self.pos += 2;
                }
                b if is_eol(b) => break,
                _ => self.pos += 1,
            }
        }
        if self.pos == start {
            return Err(fail(start, "missing measurement"));
        }
        Ok(Token {
            raw: &self.input[start..self.pos],
            escaped,
            kind: TokenKind::Measurement,
        })
    }

    /// A tag key, tag value or field key. Keys end at `=`; tag values at `,` or a blank.
    fn name(&mut self, what: &'static str, is_key: bool) -> Result<Token<'a>, Fail> {
        let start = self.pos;
        let mut escaped = false;
        loop {
            self.skip_plain();
            match self.bytes.get(self.pos) {
                Some(b'\\') if self.bytes.get(self.pos + 1).is_some_and(|&n| !is_eol(n)) => {
                    escaped = true;
                    self.pos += 2;
                }
                Some(b'=') if is_key => break,
                Some(b'=') => {
                    return Err(fail(self.pos, format!("unescaped '=' in {what}")));
                }
                Some(b',' | b' ' | b'\t') | None if !is_key => break,
                Some(b',' | b' ' | b'\t') | None => {
                    return Err(fail(
                        self.pos,
                        format!("{what} '{}' is missing '='", &self.input[start..self.pos]),
                    ));
                }
                Some(&b) if is_eol(b) => {
                    if is_key {
                        return Err(fail(
                            self.pos,
                            format!("{what} '{}' is missing '='", &self.input[start..self.pos]),
                        ));
                    }
                    break;
                }
                Some(_) => self.pos += 1,
            }
        }
        if self.pos == start {
            return Err(fail(start, format!("empty {what}")));
        }
        let token = Token {
            raw: &self.input[start..self.pos],
            escaped,
            kind: TokenKind::Name,
        };
        if is_key {
            self.pos += 1; // '='
        }
        Ok(token)
    }

    fn field_value(&mut self, key: &Token<'a>) -> Result<FieldValue<'a>, Fail> {
        let start = self.pos;
        if self.bytes.get(self.pos) == Some(&b'"') {
            self.pos += 1;
            let body = self.pos;
            let mut escaped = false;
            loop {
                match self.bytes.get(self.pos) {
                    None => {
                        return Err(Fail {
                            at: start,
                            reason: format!("unterminated string value of field '{key}'"),
                            unterminated: true,
                        });
                    }
                    Some(b'\\') if self.pos + 1 < self.bytes.len() => {
                        escaped = true;
                        self.pos += 2;
                    }
                    Some(b'"') => break,
                    Some(b'\n') => {
                        // A quoted string may span lines; later lines keep their numbers.
                        self.line_no += 1;
                        self.pos += 1;
                    }
                    Some(_) => self.pos += 1,
                }
            }
            let raw = &self.input[body..self.pos];
            self.pos += 1;
            return Ok(FieldValue::String(Token {
                raw,
                escaped,
                kind: TokenKind::QuotedString,
            }));
        }
        loop {
            self.skip_plain();
            match self.bytes.get(self.pos) {
                Some(&b) if b == b',' || b == b' ' || b == b'\t' || is_eol(b) => break,
                Some(_) => self.pos += 1,
                None => break,
            }
        }
        let text = &self.input[start..self.pos];
        parse_scalar(text).map_err(|reason| fail(start, format!("field '{key}': {reason}")))
    }

    fn timestamp(&mut self) -> Result<Option<i64>, Fail> {
        let start = self.pos;
        loop {
            self.skip_plain();
            match self.bytes.get(self.pos) {
                Some(&b) if b == b' ' || b == b'\t' || is_eol(b) => break,
                Some(_) => self.pos += 1,
                None => break,
            }
        }
        let text = &self.input[start..self.pos];
        if text.is_empty() {
            return Ok(None);
        }
        let value: i64 = parse_i64(text).ok_or_else(|| {
            let digits = text.strip_prefix('-').unwrap_or(text);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                fail(start, format!("timestamp '{text}' is out of range"))
            } else {
                fail(
                    start,
                    format!("invalid timestamp '{text}': expected an integer"),
                )
            }
        })?;
        let scale = if self.auto {
            match value.unsigned_abs() {
                v if v < 5_000_000_000 => 1_000_000_000,
                v if v < 5_000_000_000_000 => 1_000_000,
                v if v < 5_000_000_000_000_000 => 1_000,
                _ => 1,
            }
        } else {
            self.scale
        };
        value.checked_mul(scale).map(Some).ok_or_else(|| {
            fail(
                start,
                format!("timestamp '{text}' is out of range for nanosecond precision"),
            )
        })
    }
}

/// Rejects a tag or field key that appears twice in one line.
fn check_duplicates<T>(
    items: &[T],
    key: impl Fn(&T) -> Token<'_>,
    what: &str,
) -> Result<(), Refusal> {
    // Fast path: equal keys have equal fingerprints (length and last byte), so when no two
    // fingerprints collide there is no duplicate. Escaped keys take the full check.
    let mut seen = 0u64;
    let mut collided = false;
    for item in items {
        let k = key(item);
        let fp = (k.raw.len() as u64)
            .wrapping_mul(31)
            .wrapping_add(u64::from(k.raw.as_bytes().last().copied().unwrap_or(0)))
            % 64;
        collided |= k.escaped || seen & (1 << fp) != 0;
        seen |= 1 << fp;
    }
    if !collided {
        return Ok(());
    }
    // Past a few keys a hash set keeps a wide line linear (a 1 MiB line can hold 100k keys).
    if items.len() > 16 {
        let mut keys = std::collections::HashSet::with_capacity(items.len());
        for item in items {
            let k = key(item);
            if !keys.insert(k.to_cow()) {
                return Err(Refusal(format!("duplicate {what} '{k}'")));
            }
        }
        return Ok(());
    }
    // A few keys: a quadratic scan beats hashing.
    for (i, a) in items.iter().enumerate() {
        let ka = key(a);
        for b in &items[i + 1..] {
            let kb = key(b);
            if ka.raw == kb.raw || (ka.escaped || kb.escaped) && ka.to_cow() == kb.to_cow() {
                return Err(Refusal(format!("duplicate {what} '{ka}'")));
            }
        }
    }
    Ok(())
}

/// Parses an unquoted field value: integer, unsigned, boolean or float.
fn parse_scalar(text: &str) -> Result<FieldValue<'static>, Refusal> {
    let bytes = text.as_bytes();
    let Some(&last) = bytes.last() else {
        return Err(Refusal("missing value".to_string()));
    };
    match last {
        b'i' if bytes.len() > 1 => {
            let digits = &text[..text.len() - 1];
            parse_i64(digits)
                .map(FieldValue::Integer)
                .ok_or_else(|| Refusal(integer_error(digits, "integer")))
        }
        b'u' if bytes.len() > 1 => {
            let digits = &text[..text.len() - 1];
            if digits.bytes().all(|b| b.is_ascii_digit()) {
                digits
                    .parse::<u64>()
                    .map(FieldValue::UInteger)
                    .map_err(|_| Refusal(format!("unsigned integer '{digits}' is out of range")))
            } else {
                Err(Refusal(format!("invalid unsigned integer '{text}'")))
            }
        }
        _ => match text {
            "t" | "T" | "true" | "True" | "TRUE" => Ok(FieldValue::Boolean(true)),
            "f" | "F" | "false" | "False" | "FALSE" => Ok(FieldValue::Boolean(false)),
            _ => parse_float(text).map(FieldValue::Float),
        },
    }
}

fn integer_error(digits: &str, what: &str) -> String {
    let body = digits.strip_prefix('-').unwrap_or(digits);
    if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        format!("{what} '{digits}' is out of range")
    } else {
        format!("invalid {what} '{digits}i'")
    }
}

fn parse_float(text: &str) -> Result<f64, Refusal> {
    // Rust also accepts "inf", "NaN" and "infinity": line protocol does not.
    let ok_start = text
        .as_bytes()
        .first()
        .is_some_and(|&b| b.is_ascii_digit() || b == b'-' || b == b'.');
    let ok_chars = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    if !(ok_start && ok_chars) {
        return Err(Refusal(format!(
            "invalid value '{text}': expected a number, an integer with suffix i or u, a boolean, or a quoted string"
        )));
    }
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(Refusal(format!("float '{text}' is out of range"))),
        Err(_) => Err(Refusal(format!("invalid float '{text}'"))),
    }
}

/// Parses a decimal i64 with an optional leading minus, without allocating.
fn parse_i64(text: &str) -> Option<i64> {
    // Line protocol allows a leading '-' but no '+'.
    let (neg, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text.as_bytes()[1..]),
        _ => (false, text.as_bytes()),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(d - b'0');
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(digit)?
        } else {
            v.checked_add(digit)?
        };
    }
    Some(v)
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
