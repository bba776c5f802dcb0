//! Unit tests of the line protocol parser: the spec's syntax, escapes, errors with line and
//! column, precision and limits.

use super::*;

use std::borrow::Cow;
use std::str::FromStr;

// ---- helpers ------------------------------------------------------------------------------------

/// Parses `input` with the default options (nanoseconds, first line 1).
fn parse_default(input: &str) -> ParsedLines<'_> {
    parse(input, ParseOptions::default())
}

/// Parses `input` with timestamps in `precision`.
fn parse_with(input: &str, precision: Precision) -> ParsedLines<'_> {
    parse(
        input,
        ParseOptions {
            precision,
            ..ParseOptions::default()
        },
    )
}

/// Parses `input`, asserting that no line was rejected.
#[track_caller]
fn ok(input: &str) -> ParsedLines<'_> {
    let parsed = parse_default(input);
    assert!(
        parsed.errors.is_empty(),
        "unexpected errors for {input:?}: {:?}",
        parsed.errors
    );
    assert_eq!(
        parsed.incomplete_tail, None,
        "incomplete tail for {input:?}"
    );
    parsed
}

/// Parses `input`, which must hold exactly one good line, and returns that line too.
#[track_caller]
fn one(input: &str) -> (ParsedLines<'_>, Line<'_>) {
    let parsed = ok(input);
    assert_eq!(
        parsed.lines.len(),
        1,
        "expected one line in {input:?}: {:?}",
        parsed.lines
    );
    let line = parsed.lines[0].clone();
    (parsed, line)
}

/// The only field of the only line of `input`.
#[track_caller]
fn only_field(input: &str) -> (Token<'_>, FieldValue<'_>) {
    let (parsed, line) = one(input);
    match parsed.fields(&line) {
        [field] => *field,
        other => panic!("expected one field in {input:?}, got {other:?}"),
    }
}

/// The string value of the only field of the only line of `input`.
#[track_caller]
fn string_value(input: &str) -> Token<'_> {
    match only_field(input) {
        (_, FieldValue::String(token)) => token,
        (_, other) => panic!("expected a string field in {input:?}, got {other:?}"),
    }
}

/// Parses the unquoted field value `text` (as the line `m v=<text>`).
#[track_caller]
fn scalar(text: &str) -> Result<FieldValue<'static>, LineError> {
    let input = format!("m v={text}");
    let parsed = parse_default(&input);
    if let Some(error) = parsed.errors.first() {
        return Err(error.clone());
    }
    let line = parsed
        .lines
        .first()
        .expect("a line without errors is parsed");
    match parsed.fields(line) {
        [(_, FieldValue::Float(v))] => Ok(FieldValue::Float(*v)),
        [(_, FieldValue::Integer(v))] => Ok(FieldValue::Integer(*v)),
        [(_, FieldValue::UInteger(v))] => Ok(FieldValue::UInteger(*v)),
        [(_, FieldValue::Boolean(v))] => Ok(FieldValue::Boolean(*v)),
        other => panic!("{text:?} did not parse to one scalar field: {other:?}"),
    }
}

/// Asserts that the unquoted field value `text` is rejected, and returns the error.
#[track_caller]
fn rejected(text: &str) -> LineError {
    match scalar(text) {
        Ok(value) => panic!("{text:?} should be rejected, got {value:?}"),
        Err(error) => error,
    }
}

/// Parses `input`, which must hold exactly one bad line and no good one, and returns its error.
/// Only an unterminated string leaves an incomplete tail, so none is expected here.
#[track_caller]
fn single_error(input: &str) -> LineError {
    let parsed = parse_default(input);
    assert!(
        parsed.lines.is_empty(),
        "unexpected good lines in {input:?}: {:?}",
        parsed.lines
    );
    assert_eq!(
        parsed.errors.len(),
        1,
        "expected one error in {input:?}: {:?}",
        parsed.errors
    );
    assert_eq!(
        parsed.incomplete_tail, None,
        "only an unterminated string leaves an incomplete tail ({input:?})"
    );
    parsed.errors[0].clone()
}

/// Asserts that `input` is rejected at 1-based `line` and `column` for a reason mentioning
/// `reason`, and returns the error.
#[track_caller]
fn assert_error(input: &str, line: usize, column: usize, reason: &str) -> LineError {
    let error = single_error(input);
    assert_eq!(
        (error.line, error.column),
        (line, column),
        "wrong position for {input:?}: {error}"
    );
    assert!(
        error.reason.contains(reason),
        "the reason for rejecting {input:?} should mention {reason:?}: {error}"
    );
    error
}

/// The tags of `line` as unescaped `key=value` strings.
fn tag_pairs<'a>(parsed: &ParsedLines<'a>, line: &Line<'a>) -> Vec<String> {
    parsed
        .tags(line)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect()
}

/// The unescaped field keys of `line`.
fn field_keys<'a>(parsed: &ParsedLines<'a>, line: &Line<'a>) -> Vec<String> {
    parsed
        .fields(line)
        .iter()
        .map(|(key, _)| key.to_string())
        .collect()
}

fn line_numbers(parsed: &ParsedLines<'_>) -> Vec<usize> {
    parsed.lines.iter().map(|line| line.line_no).collect()
}

fn error_lines(parsed: &ParsedLines<'_>) -> Vec<usize> {
    parsed.errors.iter().map(|error| error.line).collect()
}

fn timestamps(parsed: &ParsedLines<'_>) -> Vec<Option<i64>> {
    parsed.lines.iter().map(|line| line.timestamp).collect()
}

// ---- names and escapes --------------------------------------------------------------------------

#[test]
fn plain_names_borrow_the_input() {
    let (parsed, line) = one("cpu,host=a1 usage=1");
    assert_eq!(line.measurement.raw(), "cpu");
    assert_eq!(line.measurement.plain(), Some("cpu"));
    assert!(matches!(line.measurement.to_cow(), Cow::Borrowed("cpu")));

    let [(key, value)] = parsed.tags(&line) else {
        panic!("expected one tag: {:?}", parsed.tags(&line));
    };
    assert_eq!(key.plain(), Some("host"));
    assert_eq!(value.plain(), Some("a1"));

    let (field, _) = parsed.fields(&line)[0];
    assert_eq!(field.plain(), Some("usage"));
    assert!(matches!(field.to_cow(), Cow::Borrowed("usage")));
}

#[test]
fn measurement_escapes_comma_and_space() {
    let (_, line) = one(r"weather\,station\ 1 temp=1");
    let name = line.measurement;
    assert_eq!(name.raw(), r"weather\,station\ 1");
    assert_eq!(name.plain(), None);
    assert_eq!(name.to_cow(), "weather,station 1");
    assert!(matches!(name.to_cow(), Cow::Owned(_)));
    assert_eq!(name.to_string(), "weather,station 1");

    let mut out = String::from("table: ");
    name.unescape_into(&mut out);
    assert_eq!(out, "table: weather,station 1", "unescape_into appends");

    assert_eq!(line.raw_tags, "");
}

#[test]
fn measurement_keeps_other_backslashes_literal() {
    // `=` is not special in a measurement, so `\=` is not an escape there.
    let (_, line) = one(r"c\=p\u\é v=1");
    assert_eq!(line.measurement.raw(), r"c\=p\u\é");
    assert_eq!(line.measurement.to_cow(), r"c\=p\u\é");
}

#[test]
fn tag_key_and_value_escapes() {
    let (parsed, line) = one(r"cpu,ho\ st\,na\=me=va\ l\,u\=e v=1");
    let [(key, value)] = parsed.tags(&line) else {
        panic!("expected one tag: {:?}", parsed.tags(&line));
    };

    assert_eq!(key.raw(), r"ho\ st\,na\=me");
    assert_eq!(key.plain(), None);
    assert_eq!(key.to_cow(), "ho st,na=me");

    assert_eq!(value.raw(), r"va\ l\,u\=e");
    assert_eq!(value.plain(), None);
    assert_eq!(value.to_cow(), "va l,u=e");
    let mut out = String::new();
    value.unescape_into(&mut out);
    assert_eq!(out, "va l,u=e");

    assert_eq!(line.raw_tags, r",ho\ st\,na\=me=va\ l\,u\=e");
}

#[test]
fn tag_names_keep_other_backslashes_literal() {
    let (parsed, line) = one(r#"cpu,k\ey=v\al\"ue,path=C:\dir v=1"#);
    assert_eq!(
        tag_pairs(&parsed, &line),
        [r#"k\ey=v\al\"ue"#, r"path=C:\dir"]
    );
}

#[test]
fn field_key_escapes() {
    let (key, value) = only_field(r"cpu us\ er\,sy\=s=1.5");
    assert_eq!(key.raw(), r"us\ er\,sy\=s");
    assert_eq!(key.plain(), None);
    assert_eq!(key.to_cow(), "us er,sy=s");
    assert_eq!(value, FieldValue::Float(1.5));

    let (key, _) = only_field(r"cpu f\ield=1");
    assert_eq!(
        key.to_cow(),
        r"f\ield",
        "a backslash before another char is literal"
    );
}

// ---- string field values ------------------------------------------------------------------------

#[test]
fn string_escapes_quote_and_backslash() {
    let token = string_value(r#"cpu msg="say \"hi\" to C:\\temp""#);
    assert_eq!(token.raw(), r#"say \"hi\" to C:\\temp"#);
    assert_eq!(token.plain(), None);
    assert_eq!(token.to_cow(), r#"say "hi" to C:\temp"#);

    let mut out = String::from(">");
    token.unescape_into(&mut out);
    assert_eq!(out, r#">say "hi" to C:\temp"#);
}

#[test]
fn string_ending_in_an_escaped_backslash() {
    let (parsed, line) = one(r#"cpu path="C:\\" 1"#);
    assert!(
        matches!(parsed.fields(&line)[0].1, FieldValue::String(s) if s.to_cow() == r"C:\"),
        "{:?}",
        parsed.fields(&line)
    );
    assert_eq!(line.timestamp, Some(1));
}

#[test]
fn string_keeps_other_backslashes_literal() {
    let token = string_value(r#"cpu msg="a\,b\ c\=d\n""#);
    assert_eq!(token.to_cow(), r"a\,b\ c\=d\n");
}

#[test]
fn string_may_hold_commas_spaces_and_equals() {
    let (parsed, line) = one(r#"cpu msg="a, b=c d",n=1i 5"#);
    assert_eq!(field_keys(&parsed, &line), ["msg", "n"]);
    let fields = parsed.fields(&line);
    assert!(matches!(fields[0].1, FieldValue::String(s) if s.plain() == Some("a, b=c d")));
    assert_eq!(fields[1].1, FieldValue::Integer(1));
    assert_eq!(line.timestamp, Some(5));
}

#[test]
fn empty_string() {
    let token = string_value(r#"cpu msg="""#);
    assert_eq!(token.raw(), "");
    assert_eq!(token.plain(), Some(""));
    assert_eq!(token.to_cow(), "");
}

#[test]
fn quoted_values_are_always_strings() {
    for text in ["true", "1i", "1.5"] {
        let input = format!("cpu v=\"{text}\"");
        assert_eq!(string_value(&input).raw(), text);
    }
}

#[test]
fn quoted_string_may_span_lines() {
    let parsed = ok("log msg=\"first\nsecond\" 1\ncpu v=2 2\n");
    let [log, cpu] = &parsed.lines[..] else {
        panic!("expected two lines: {:?}", parsed.lines);
    };
    assert_eq!(log.line_no, 1);
    assert!(
        matches!(parsed.fields(log)[0].1, FieldValue::String(s) if s.raw() == "first\nsecond"),
        "{:?}",
        parsed.fields(log)
    );
    assert_eq!(log.timestamp, Some(1));
    assert_eq!(cpu.line_no, 3, "the line after a two-line string is line 3");
    assert_eq!(cpu.timestamp, Some(2));
    assert_eq!(parsed.end_line, 4);
}

#[test]
fn errors_after_a_multi_line_string_have_the_right_line() {
    // The bad timestamp is on the string's second physical line; the next line is line 3.
    let parsed = parse_default("log msg=\"a\nb\" oops\ncpu v=1\n");
    let [error] = &parsed.errors[..] else {
        panic!("expected one error: {:?}", parsed.errors);
    };
    assert_eq!((error.line, error.column), (2, 4), "{error}");
    assert!(error.reason.contains("timestamp"), "{error}");
    assert_eq!(line_numbers(&parsed), [3]);
    assert_eq!(parsed.end_line, 4);
}

// ---- scalar field values ------------------------------------------------------------------------

#[test]
fn float_values() {
    let cases = [
        ("1", 1.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-1.5", -1.5),
        ("1e3", 1000.0),
        ("1E3", 1000.0),
        ("1e+3", 1000.0),
        ("1.5E-3", 0.0015),
        (".5", 0.5),
        ("-.5", -0.5),
        ("1.", 1.0),
        ("1.e+78", 1e78),
        ("-1.234456e+78", -1.234456e78),
    ];
    for (text, expected) in cases {
        assert_eq!(scalar(text), Ok(FieldValue::Float(expected)), "{text}");
    }
}

#[test]
fn non_numbers_are_rejected() {
    let cases = [
        "inf", "-inf", "NaN", "nan", "infinity", "Infinity", "abc", "1.2.3", "1x", "e5", "-", ".",
        "1e", "--1", "1e400",
    ];
    for text in cases {
        let error = rejected(text);
        assert_eq!((error.line, error.column), (1, 5), "{text}: {error}");
        assert!(error.reason.contains("field 'v'"), "{text}: {error}");
        assert!(
            error.reason.contains(&format!("'{text}'")),
            "{text}: {error}"
        );
    }
    assert!(rejected("1e400").reason.contains("out of range"));
    assert!(rejected("abc").reason.contains("invalid value"));
}

#[test]
fn integer_values() {
    let cases = [
        ("0i", 0),
        ("1i", 1),
        ("-1i", -1),
        ("9223372036854775807i", i64::MAX),
        ("-9223372036854775808i", i64::MIN),
    ];
    for (text, expected) in cases {
        assert_eq!(scalar(text), Ok(FieldValue::Integer(expected)), "{text}");
    }
}

#[test]
fn integer_overflow_is_an_error() {
    for text in [
        "9223372036854775808i",
        "-9223372036854775809i",
        "99999999999999999999i",
    ] {
        let error = rejected(text);
        assert_eq!(error.column, 5, "{text}: {error}");
        assert!(error.reason.contains("out of range"), "{text}: {error}");
    }
}

#[test]
fn malformed_integers_are_rejected() {
    for text in ["1.5i", "1e3i", "-i", "abci", "i", "1I"] {
        let error = rejected(text);
        assert_eq!(error.column, 5, "{text}: {error}");
        assert!(
            error.reason.contains(&format!("'{text}'")),
            "{text}: {error}"
        );
    }
    assert!(rejected("1.5i").reason.contains("invalid integer"));
}

#[test]
fn unsigned_values() {
    let cases = [("0u", 0), ("1u", 1), ("18446744073709551615u", u64::MAX)];
    for (text, expected) in cases {
        assert_eq!(scalar(text), Ok(FieldValue::UInteger(expected)), "{text}");
    }
}

#[test]
fn unsigned_overflow_is_an_error() {
    let error = rejected("18446744073709551616u");
    assert_eq!(error.column, 5, "{error}");
    assert!(error.reason.contains("out of range"), "{error}");
}

#[test]
fn negative_and_malformed_unsigned_are_rejected() {
    for text in ["-1u", "-0u", "1.5u", "abcu"] {
        let error = rejected(text);
        assert_eq!(error.column, 5, "{text}: {error}");
        assert!(error.reason.contains("unsigned"), "{text}: {error}");
        assert!(
            error.reason.contains(&format!("'{text}'")),
            "{text}: {error}"
        );
    }
    for text in ["u", "1U"] {
        let error = rejected(text);
        assert!(
            error.reason.contains(&format!("'{text}'")),
            "{text}: {error}"
        );
    }
}

#[test]
fn boolean_values() {
    for text in ["t", "T", "true", "True", "TRUE"] {
        assert_eq!(scalar(text), Ok(FieldValue::Boolean(true)), "{text}");
    }
    for text in ["f", "F", "false", "False", "FALSE"] {
        assert_eq!(scalar(text), Ok(FieldValue::Boolean(false)), "{text}");
    }
}

#[test]
fn other_boolean_spellings_are_rejected() {
    for text in ["tRUE", "tRue", "truE", "fALSE", "yes", "on", "tr"] {
        let error = rejected(text);
        assert_eq!(error.column, 5, "{text}: {error}");
        assert!(
            error.reason.contains(&format!("'{text}'")),
            "{text}: {error}"
        );
    }
}

#[test]
fn leading_plus_sign_is_rejected() {
    // The reference parsers (InfluxDB 1.x in Go, InfluxDB 3 in Rust) accept only a leading '-'.
    for text in ["+1", "+1.5", "+1i", "+1u"] {
        let error = rejected(text);
        assert_eq!(error.column, 5, "{text}: {error}");
    }
    assert_error("cpu v=1 +5", 1, 9, "timestamp");
}

#[test]
fn missing_field_value() {
    assert_error("cpu v=", 1, 7, "missing value");
    assert_error("cpu v=,w=1", 1, 7, "missing value");
    assert_error("cpu v= 1", 1, 7, "missing value");
}

// ---- timestamps ---------------------------------------------------------------------------------

#[test]
fn timestamp_is_optional() {
    assert_eq!(one("cpu v=1").1.timestamp, None);
    assert_eq!(one("cpu v=1 ").1.timestamp, None);
    assert_eq!(one("cpu v=1 0").1.timestamp, Some(0));
    assert_eq!(
        one("cpu v=1 1700000000000000000").1.timestamp,
        Some(1_700_000_000_000_000_000)
    );
}

#[test]
fn negative_and_extreme_timestamps() {
    assert_eq!(one("cpu v=1 -1").1.timestamp, Some(-1));
    assert_eq!(
        one("cpu v=1 -9223372036854775808").1.timestamp,
        Some(i64::MIN)
    );
    assert_eq!(
        one("cpu v=1 9223372036854775807").1.timestamp,
        Some(i64::MAX)
    );
}

#[test]
fn timestamps_are_scaled_by_precision() {
    let cases: [(Precision, i64); 4] = [
        (Precision::Nanosecond, 1),
        (Precision::Microsecond, 1_000),
        (Precision::Millisecond, 1_000_000),
        (Precision::Second, 1_000_000_000),
    ];
    for (precision, scale) in cases {
        assert_eq!(precision.nanos_per_unit(), scale, "{precision}");
        let parsed = parse_with("cpu v=1 5\ncpu v=1 -5\ncpu v=1\n", precision);
        assert!(parsed.errors.is_empty(), "{precision}: {:?}", parsed.errors);
        assert_eq!(
            timestamps(&parsed),
            [Some(5 * scale), Some(-5 * scale), None],
            "{precision}"
        );
    }

    let parsed = parse_with("cpu v=1 1700000000", Precision::Second);
    assert_eq!(timestamps(&parsed), [Some(1_700_000_000_000_000_000)]);
}

#[test]
fn timestamp_overflow_when_scaling_is_an_error() {
    // 9_223_372_036 s is the last whole second that fits in i64 nanoseconds.
    let parsed = parse_with("cpu v=1 9223372036", Precision::Second);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(timestamps(&parsed), [Some(9_223_372_036_000_000_000)]);

    let cases = [
        (Precision::Second, "9223372036854775807"),
        (Precision::Second, "9223372037"),
        (Precision::Second, "-9223372037"),
        (Precision::Millisecond, "9223372036855"),
        (Precision::Microsecond, "9223372036854776"),
        (Precision::Microsecond, "-9223372036854775808"),
    ];
    for (precision, text) in cases {
        let input = format!("cpu v=1 {text}");
        let parsed = parse_with(&input, precision);
        assert!(
            parsed.lines.is_empty(),
            "{text} in {precision} should be rejected"
        );
        let [error] = &parsed.errors[..] else {
            panic!(
                "expected one error for {text} in {precision}: {:?}",
                parsed.errors
            );
        };
        assert_eq!((error.line, error.column), (1, 9), "{error}");
        assert!(error.reason.contains("out of range"), "{error}");
    }
}

#[test]
fn non_integer_timestamps_are_rejected() {
    for text in [
        "12.5",
        "1e9",
        "abc",
        "12i",
        "-",
        "0x10",
        "9223372036854775808",
    ] {
        let input = format!("cpu v=1 {text}");
        let error = single_error(&input);
        assert_eq!((error.line, error.column), (1, 9), "{text}: {error}");
        assert!(error.reason.contains("timestamp"), "{text}: {error}");
    }
}

#[test]
fn text_after_timestamp_is_an_error() {
    assert_error("cpu v=1 123 456", 1, 13, "after timestamp");
    assert_error("cpu v=1 123 x=1\n", 1, 13, "after timestamp");
}

#[test]
fn text_right_after_a_string_is_an_error() {
    assert_error(r#"cpu s="abc"x 1"#, 1, 12, "after the fields");
}

// ---- comments, blank lines and line ends --------------------------------------------------------

#[test]
fn comments_and_blank_lines_are_skipped() {
    let input = "# header\n\ncpu v=1\n   # indented\n\t# tab-indented\n   \n\ncpu v=2\n# last";
    let parsed = ok(input);
    assert_eq!(line_numbers(&parsed), [3, 8]);
}

#[test]
fn inputs_without_points() {
    for input in ["", "\n", "\n\n\n", "   ", "# only a comment", "\r\n\r\n"] {
        assert!(ok(input).lines.is_empty(), "{input:?}");
    }
    assert_eq!(parse_default("").end_line, 1);
    assert_eq!(parse_default("\n\n\n").end_line, 4);
}

#[test]
fn crlf_line_endings() {
    let input = "cpu,host=a v=1 1\r\n\r\n# comment\r\nmem,host=b free=2i\r\nlog msg=\"hi\" 3\r\n";
    let parsed = ok(input);
    assert_eq!(line_numbers(&parsed), [1, 4, 5]);
    let [cpu, mem, log] = &parsed.lines[..] else {
        panic!("expected three lines: {:?}", parsed.lines);
    };
    assert_eq!(tag_pairs(&parsed, cpu), ["host=a"]);
    assert_eq!(cpu.timestamp, Some(1));
    assert_eq!(tag_pairs(&parsed, mem), ["host=b"]);
    assert_eq!(parsed.fields(mem)[0].1, FieldValue::Integer(2));
    assert_eq!(mem.timestamp, None);
    assert!(matches!(parsed.fields(log)[0].1, FieldValue::String(s) if s.raw() == "hi"));
    assert_eq!(log.timestamp, Some(3));
    assert_eq!(parsed.end_line, 6);
}

#[test]
fn missing_final_newline() {
    let parsed = ok("cpu v=1\ncpu v=2 2");
    assert_eq!(line_numbers(&parsed), [1, 2]);
    assert_eq!(timestamps(&parsed), [None, Some(2)]);
    assert_eq!(string_value(r#"cpu msg="end""#).raw(), "end");
}

#[test]
fn trailing_blanks_are_ignored() {
    let parsed = ok("cpu v=1   \ncpu v=2 5   \ncpu v=3\t\ncpu msg=\"x\"  \ncpu v=4 6 \r\n");
    assert_eq!(timestamps(&parsed), [None, Some(5), None, None, Some(6)]);
}

#[test]
fn leading_blanks_are_ignored() {
    let parsed = ok("   cpu v=1\n\tmem v=2 5\n");
    let names: Vec<&str> = parsed.lines.iter().map(|l| l.measurement.raw()).collect();
    assert_eq!(names, ["cpu", "mem"]);
    assert_eq!(line_numbers(&parsed), [1, 2]);
    assert_eq!(timestamps(&parsed), [None, Some(5)]);
}

#[test]
fn lone_carriage_return_at_end_of_input() {
    assert_eq!(one("cpu v=1\r").1.timestamp, None);
    assert_eq!(one("cpu v=1 7\r").1.timestamp, Some(7));
    assert_eq!(one("cpu,host=a v=1\n\r").1.line_no, 1);
}

// ---- errors -------------------------------------------------------------------------------------

#[test]
fn missing_fields() {
    assert_error("cpu", 1, 4, "missing field");
    assert_error("cpu\n", 1, 4, "missing field");
    assert_error("cpu  \n", 1, 6, "missing field");
    assert_error("cpu,host=a\n", 1, 11, "missing field");
    assert_error("cpu,host=a\r\n", 1, 11, "missing field");
    assert_error("cpu v=1,", 1, 9, "missing field");
}

#[test]
fn tag_set_at_end_of_input() {
    // A tag value needs no '='; the line simply has no fields.
    assert_error("cpu,host=a", 1, 11, "missing field");
    assert_error("cpu,host=", 1, 10, "empty");
}

#[test]
fn empty_tag_value() {
    assert_error("cpu,host= v=1", 1, 10, "empty");
    assert_error("cpu,host=,dc=x v=1", 1, 10, "empty");
    assert_error("cpu,host=\n", 1, 10, "empty");
}

#[test]
fn tag_key_without_equals() {
    let error = assert_error("cpu,host v=1", 1, 9, "missing '='");
    assert!(error.reason.contains("'host'"), "{error}");
    assert_error("cpu,host,dc=x v=1", 1, 9, "missing '='");
    assert_error("cpu,host\n", 1, 9, "missing '='");
    assert_error("cpu,host", 1, 9, "missing '='");
    assert_error("cpu,=a v=1", 1, 5, "empty tag key");
    assert_error("cpu,host=a, v=1", 1, 12, "tag key");
}

#[test]
fn unescaped_equals_in_tag_value() {
    assert_error("cpu,host=a=b v=1", 1, 11, "unescaped '='");
}

#[test]
fn duplicate_tag_key() {
    let error = assert_error("cpu,a=1,b=2,a=3 v=1", 1, 4, "duplicate tag");
    assert!(error.reason.contains("'a'"), "{error}");
    assert_error(r"cpu,a\ b=1,a\ b=2 v=1", 1, 4, "duplicate tag");

    // Keys that differ only in which character is escaped are distinct.
    let (parsed, line) = one(r"cpu,a\ b=1,a\,b=2 v=1");
    assert_eq!(tag_pairs(&parsed, &line), ["a b=1", "a,b=2"]);
}

#[test]
fn duplicate_field_key() {
    let error = assert_error("cpu v=1,w=2,v=3", 1, 5, "duplicate field");
    assert!(error.reason.contains("'v'"), "{error}");
    assert_error("cpu,t=x v=1,v=2i", 1, 9, "duplicate field");
}

#[test]
fn field_key_without_equals() {
    let error = assert_error("cpu value 1", 1, 10, "missing '='");
    assert!(error.reason.contains("'value'"), "{error}");
    assert_error("cpu value", 1, 10, "missing '='");
    assert_error("cpu v=1,w", 1, 10, "missing '='");
    assert_error("cpu =1", 1, 5, "empty field key");
}

#[test]
fn missing_measurement() {
    assert_error(",host=a v=1", 1, 1, "missing measurement");
    assert_error("  ,host=a v=1", 1, 3, "missing measurement");
}

#[test]
fn invalid_field_value() {
    let error = assert_error("cpu v=abc 1", 1, 7, "invalid value 'abc'");
    assert!(error.reason.contains("field 'v'"), "{error}");
    assert_error("cpu a=1,b=2,c=oops", 1, 15, "field 'c'");
}

#[test]
fn columns_count_bytes() {
    // `ü` and `å` take two bytes each.
    assert_error("cpü,tåg=x v=bad", 1, 15, "invalid value");
}

#[test]
fn error_position_is_relative_to_its_line() {
    let parsed = parse_default("cpu v=1\n\n  mem v=oops\n");
    let [error] = &parsed.errors[..] else {
        panic!("expected one error: {:?}", parsed.errors);
    };
    assert_eq!((error.line, error.column), (3, 9), "{error}");
    assert_eq!(line_numbers(&parsed), [1]);
}

#[test]
fn line_error_display() {
    let parsed = parse_default("cpu v=1\ncpu v=oops");
    let [error] = &parsed.errors[..] else {
        panic!("expected one error: {:?}", parsed.errors);
    };
    let text = error.to_string();
    assert!(text.starts_with("line 2, column 7: "), "{text}");
    assert!(text.contains("oops"), "{text}");
}

#[test]
fn unterminated_string() {
    let input = "cpu v=1 1\ncpu msg=\"never closed\nmore text";
    let parsed = parse_default(input);
    assert_eq!(line_numbers(&parsed), [1]);
    let [error] = &parsed.errors[..] else {
        panic!("expected one error: {:?}", parsed.errors);
    };
    assert_eq!((error.line, error.column), (2, 9), "{error}");
    assert!(error.reason.contains("unterminated"), "{error}");
    assert!(error.reason.contains("'msg'"), "{error}");
    assert_eq!(parsed.incomplete_tail, Some(10));
    assert_eq!(parsed.incomplete_tail, input.find("cpu msg"));
}

#[test]
fn escaped_quote_does_not_close_a_string() {
    let parsed = parse_default(r#"cpu msg="ends with \""#);
    assert!(parsed.lines.is_empty());
    let [error] = &parsed.errors[..] else {
        panic!("expected one error: {:?}", parsed.errors);
    };
    assert_eq!((error.line, error.column), (1, 9), "{error}");
    assert!(error.reason.contains("unterminated"), "{error}");
    assert_eq!(parsed.incomplete_tail, Some(0));
}

// ---- error recovery -----------------------------------------------------------------------------

#[test]
fn bad_line_between_good_lines() {
    let parsed = parse_default("cpu,a=1 v=1 1\ncpu,b=2 v=oops 2\ncpu,c=3 w=3i 3\n");
    assert_eq!(line_numbers(&parsed), [1, 3]);
    assert_eq!(error_lines(&parsed), [2]);
    assert_eq!(parsed.errors[0].column, 11);
    assert_eq!(parsed.incomplete_tail, None);
    assert_eq!(parsed.end_line, 4);

    // The bad line's tags and fields do not leak into the next line.
    let last = &parsed.lines[1];
    assert_eq!(tag_pairs(&parsed, last), ["c=3"]);
    assert_eq!(field_keys(&parsed, last), ["w"]);
    assert_eq!(parsed.fields(last)[0].1, FieldValue::Integer(3));
    assert_eq!(last.timestamp, Some(3));
}

#[test]
fn every_bad_line_is_reported_once() {
    let input = "cpu\n,t=a v=1\ncpu v=\ncpu v=1 x\ncpu,t v=1\ncpu v=1 1 2\ncpu s=\"x\"y\n";
    let parsed = parse_default(input);
    assert!(parsed.lines.is_empty(), "{:?}", parsed.lines);
    assert_eq!(
        error_lines(&parsed),
        [1, 2, 3, 4, 5, 6, 7],
        "{:?}",
        parsed.errors
    );
    assert_eq!(parsed.end_line, 8);
    assert_eq!(parsed.incomplete_tail, None);
}

#[test]
fn recovery_with_crlf_and_no_final_newline() {
    let parsed = parse_default("bad\r\ncpu v=1\r\ncpu v=oops");
    assert_eq!(line_numbers(&parsed), [2]);
    assert_eq!(error_lines(&parsed), [1, 3]);
}

// ---- options ------------------------------------------------------------------------------------

#[test]
fn default_options() {
    let options = ParseOptions::default();
    assert_eq!(options.first_line, 1);
    assert_eq!(options.precision, Precision::Nanosecond);
    assert_eq!(Precision::default(), Precision::Nanosecond);
}

#[test]
fn first_line_offsets_line_numbers() {
    let options = ParseOptions {
        first_line: 41,
        ..ParseOptions::default()
    };
    let parsed = parse("cpu v=1\n\ncpu v=oops\ncpu v=2\n", options);
    assert_eq!(line_numbers(&parsed), [41, 44]);
    assert_eq!(error_lines(&parsed), [43]);
    assert_eq!(parsed.end_line, 45);
}

#[test]
fn precision_from_str_accepts_every_spelling() {
    let cases = [
        ("ns", Precision::Nanosecond),
        ("n", Precision::Nanosecond),
        ("nanosecond", Precision::Nanosecond),
        ("nanoseconds", Precision::Nanosecond),
        ("us", Precision::Microsecond),
        ("u", Precision::Microsecond),
        ("µs", Precision::Microsecond),
        ("microsecond", Precision::Microsecond),
        ("microseconds", Precision::Microsecond),
        ("ms", Precision::Millisecond),
        ("millisecond", Precision::Millisecond),
        ("milliseconds", Precision::Millisecond),
        ("s", Precision::Second),
        ("second", Precision::Second),
        ("seconds", Precision::Second),
    ];
    for (text, expected) in cases {
        assert_eq!(Precision::from_str(text), Ok(expected), "{text}");
    }
}

#[test]
fn precision_from_str_rejects_unknown_units() {
    for text in ["", "NS", "sec", "ps", "1s", "nanos"] {
        let result = Precision::from_str(text);
        let Err(message) = &result else {
            panic!("{text:?} should be rejected, got {result:?}");
        };
        assert!(message.contains("unknown precision"), "{message}");
        assert!(message.contains(&format!("'{text}'")), "{message}");
    }
}

#[test]
fn precision_display_round_trips() {
    for precision in [
        Precision::Nanosecond,
        Precision::Microsecond,
        Precision::Millisecond,
        Precision::Second,
    ] {
        assert_eq!(Precision::from_str(&precision.to_string()), Ok(precision));
    }
}

// ---- tag and field slices -----------------------------------------------------------------------

#[test]
fn tags_and_fields_are_sliced_per_line() {
    let input = "cpu,a=1,b=2 x=1i,y=\"s\",z=t 7\nmem free=3u\ndisk,dev=sda used=0.5 9\n";
    let parsed = ok(input);
    let [cpu, mem, disk] = &parsed.lines[..] else {
        panic!("expected three lines: {:?}", parsed.lines);
    };

    assert_eq!(cpu.measurement.raw(), "cpu");
    assert_eq!(cpu.raw_tags, ",a=1,b=2");
    assert_eq!(tag_pairs(&parsed, cpu), ["a=1", "b=2"]);
    assert_eq!(field_keys(&parsed, cpu), ["x", "y", "z"]);
    let cpu_fields = parsed.fields(cpu);
    assert_eq!(cpu_fields[0].1, FieldValue::Integer(1));
    assert!(matches!(cpu_fields[1].1, FieldValue::String(s) if s.raw() == "s"));
    assert_eq!(cpu_fields[2].1, FieldValue::Boolean(true));
    assert_eq!(cpu.timestamp, Some(7));

    assert_eq!(mem.raw_tags, "");
    assert!(parsed.tags(mem).is_empty());
    assert_eq!(field_keys(&parsed, mem), ["free"]);
    assert_eq!(parsed.fields(mem)[0].1, FieldValue::UInteger(3));
    assert_eq!(mem.timestamp, None);

    assert_eq!(disk.raw_tags, ",dev=sda");
    assert_eq!(tag_pairs(&parsed, disk), ["dev=sda"]);
    assert_eq!(parsed.fields(disk)[0].1, FieldValue::Float(0.5));
    assert_eq!(disk.timestamp, Some(9));
}

#[test]
fn wide_lines_find_duplicates_among_many_keys_escaped_or_not() {
    let fields: Vec<String> = (0..20_000).map(|i| format!("f{i}={i}i")).collect();
    let wide = format!("m {} 1", fields.join(","));
    let (_, line) = one(&wide);
    assert_eq!(line.fields.len(), 20_000);
    // The same escaped key twice, after 20k others.
    let dup = format!("m {},f\\ 1=1i,f\\ 1=2i 1", fields.join(","));
    let e = single_error(&dup);
    assert!(e.to_string().contains("duplicate field 'f 1'"), "{e}");
    let tags: Vec<String> = (0..100).map(|i| format!("t{i}=v")).collect();
    let e = single_error(&format!("m,{},t7=w v=1 1", tags.join(",")));
    assert!(e.to_string().contains("duplicate tag 't7'"), "{e}");
}
