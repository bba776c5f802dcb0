//! The line protocol parser on arbitrary input, then the whole write path: nothing may panic,
//! and every line is either stored or reported with its line number.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rivulet::line_protocol::{ParseOptions, parse};
use rivulet::{Config, Db, Durability, Precision, WriteOptions};

fn db() -> &'static Db {
    static DB: OnceLock<Db> = OnceLock::new();
    DB.get_or_init(|| {
        Db::open_with(Config {
            durability: Durability::None,
            ..Config::default()
        })
        .expect("db")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse(text, ParseOptions::default());
    let lines = 1 + text.matches('\n').count();
    for line in &parsed.lines {
        assert!(line.line_no >= 1 && line.line_no <= lines);
        let _ = line.measurement.to_cow();
        for (k, v) in parsed.tags(line) {
            let _ = (k.to_cow(), v.to_cow());
        }
    }
    for e in &parsed.errors {
        assert!(e.line >= 1 && e.line <= lines);
    }
    let options = WriteOptions {
        precision: Precision::Nanosecond,
        accept_partial: true,
        ..WriteOptions::default()
    };
    if let Ok(receipt) = db().write_lines_with("fuzz", text, &options) {
        assert!(receipt.rows <= parsed.lines.len());
    }
});
