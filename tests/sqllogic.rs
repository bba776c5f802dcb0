//! Runs every `sql/**/*.slt` file (sqllogictest) against a fresh in-memory database.
//!
//! Besides SQL, a record may write line protocol through the normal write path:
//!
//! ```text
//! statement ok
//! WRITE LINES db=main precision=s partial
//! cpu,host=a usage=1 1700000000
//! ```
//!
//! (`db`, `precision` and `partial` are optional; the statement count is the rows written.)
//! Each file runs against a fresh database in its own temporary directory, which persists and
//! compacts only when told: `PERSIST`, `COMPACT` and `APPLY RETENTION` do what `Db::persist`,
//! `Db::compact` and `Db::apply_retention` do, and `REOPEN` closes the database and opens the
//! directory again (each a `statement ok` record).
//! The clock is frozen at 2024-01-01T00:00:00Z, so lines without a timestamp get that time.
//! `RIVULET_SLT_COMPLETE=1 cargo test --test sqllogic` rewrites the expected results in place;
//! a file name argument runs only the files whose path contains it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use rivulet::{Config, Db, Durability, ManualClock, Precision, WriteOptions};
use sqllogictest::{DBOutput, DefaultColumnType};

/// 2024-01-01T00:00:00Z.
const FROZEN_NOW_NS: i64 = 1_704_067_200_000_000_000;

/// A file's database and its directory, shared by the runner's connections.
struct SltState {
    dir: tempfile::TempDir,
    db: std::sync::Mutex<Option<Db>>,
}

struct SltDb {
    state: Arc<SltState>,
}

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

fn err(e: impl std::fmt::Display) -> SltError {
    SltError(e.to_string())
}

impl SltDb {
    fn db(&self) -> Result<Db, SltError> {
        self.state
            .db
            .lock()
            .map_err(|_| err("a statement panicked"))?
            .clone()
            .ok_or_else(|| err("the database is not open"))
    }

    /// `PERSIST`, `COMPACT`, `APPLY RETENTION` and `REOPEN`, if `sql` is one of them.
    fn storage_command(&self, sql: &str) -> Option<Result<DBOutput<DefaultColumnType>, SltError>> {
        let words: Vec<String> = sql
            .split_whitespace()
            .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
            .collect();
        let done = |r: Result<(), SltError>| Some(r.map(|()| DBOutput::StatementComplete(0)));
        match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["PERSIST"] => done(
                self.db()
                    .and_then(|db| db.persist().map(|_| ()).map_err(err)),
            ),
            ["COMPACT"] => done(
                self.db()
                    .and_then(|db| db.compact().map(|_| ()).map_err(err)),
            ),
            ["APPLY", "RETENTION"] => done(
                self.db()
                    .and_then(|db| db.apply_retention().map(|_| ()).map_err(err)),
            ),
            ["REOPEN"] => done((|| {
                let mut slot = self
                    .state
                    .db
                    .lock()
                    .map_err(|_| err("a statement panicked"))?;
                if let Some(db) = slot.take() {
                    db.close().map_err(err)?;
                }
                *slot = Some(open_db(self.state.dir.path()).map_err(err)?);
                Ok(())
            })()),
            _ => None,
        }
    }

    fn write_lines(&self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let (header, body) = sql.split_once('\n').unwrap_or((sql, ""));
        let mut db = "main".to_string();
        let mut options = WriteOptions::default();
        for word in header.split_whitespace().skip(2) {
            match word.split_once('=') {
                Some(("db", v)) => db = v.to_string(),
                Some(("precision", v)) => {
                    options.precision = v.parse::<Precision>().map_err(err)?;
                }
                None if word == "partial" => options.accept_partial = true,
                _ => return Err(err(format!("unknown WRITE LINES option '{word}'"))),
            }
        }
        // The first body line is line 1, as in a request body.
        let receipt = self
            .db()?
            .write_lines_with(&db, body, &options)
            .map_err(err)?;
        if receipt.rejected_total > 0 {
            let list: Vec<String> = receipt.rejected.iter().map(|e| e.to_string()).collect();
            return Err(err(format!(
                "{} rows written; rejected: {}",
                receipt.rows,
                list.join("; ")
            )));
        }
        Ok(DBOutput::StatementComplete(receipt.rows as u64))
    }
}

fn column_type(dt: &DataType) -> DefaultColumnType {
    match dt {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => DefaultColumnType::Integer,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(_, _) => {
            DefaultColumnType::FloatingPoint
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(_, _) => {
            DefaultColumnType::Text
        }
        _ => DefaultColumnType::Any,
    }
}

fn rows_of(batches: &[RecordBatch]) -> Result<DBOutput<DefaultColumnType>, SltError> {
    let Some(first) = batches.first() else {
        return Ok(DBOutput::Rows {
            types: Vec::new(),
            rows: Vec::new(),
        });
    };
    let types = first
        .schema()
        .fields()
        .iter()
        .map(|f| column_type(f.data_type()))
        .collect();
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .zip(batch.columns())
                    .map(|(f, c)| {
                        if let Some(v) = c.as_any().downcast_ref::<arrow::array::Float64Array>()
                            && c.is_valid(row)
                        {
                            // Rust's shortest round-trip form: 6 rather than 6.0.
                            return format!("{}", v.value(row));
                        }
                        let s = f.value(row).to_string();
                        if s.is_empty() && c.is_valid(row) {
                            "(empty)".to_string()
                        } else {
                            s
                        }
                    })
                    .collect(),
            );
        }
    }
    Ok(DBOutput::Rows { types, rows })
}

#[async_trait]
impl sqllogictest::AsyncDB for SltDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let trimmed = sql.trim_start();
        if trimmed.starts_with("WRITE LINES") {
            return self.write_lines(trimmed);
        }
        if let Some(done) = self.storage_command(trimmed) {
            return done;
        }
        let db = self.db()?;
        let batches = db.sql(sql).await.map_err(err)?;
        if trimmed.to_ascii_uppercase().starts_with("INSERT") {
            let count = batches
                .first()
                .and_then(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<arrow::array::UInt64Array>()
                        .map(|a| a.value(0))
                })
                .unwrap_or(0);
            return Ok(DBOutput::StatementComplete(count));
        }
        rows_of(&batches)
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "rivulet"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            slt_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
}

/// The database of a file's directory: persisting, compacting and expiring only when told.
fn open_db(dir: &Path) -> Result<Db, rivulet::Error> {
    Db::open_with(Config {
        durability: Durability::None,
        clock: Arc::new(ManualClock::new(FROZEN_NOW_NS)),
        background: false,
        ..Config::with_dir(dir)
    })
}

async fn run_file(path: &Path, complete: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let db = open_db(dir.path()).map_err(|e| e.to_string())?;
    let state = Arc::new(SltState {
        dir,
        db: std::sync::Mutex::new(Some(db)),
    });
    let shared = state.clone();
    let mut runner = sqllogictest::Runner::new(move || {
        let state = shared.clone();
        async move { Ok::<_, SltError>(SltDb { state }) }
    });
    let result = if complete {
        runner
            .update_test_file(
                path,
                " ",
                sqllogictest::default_validator,
                sqllogictest::default_normalizer,
                sqllogictest::default_column_validator,
            )
            .await
            .map_err(|e| e.to_string())
    } else {
        runner
            .run_file_async(path)
            .await
            .map_err(|e| e.display(true).to_string())
    };
    drop(runner);
    let db = state.db.lock().ok().and_then(|mut slot| slot.take());
    if let Some(db) = db {
        db.close().map_err(|e| e.to_string())?;
    }
    result
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files = Vec::new();
    slt_files(&root, &mut files);
    files.sort();
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() {
        files.retain(|f| {
            filters
                .iter()
                .any(|p| f.to_string_lossy().contains(p.as_str()))
        });
    }
    let complete = std::env::var_os("RIVULET_SLT_COMPLETE").is_some();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            std::process::exit(2);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        match runtime.block_on(run_file(file, complete)) {
            Ok(()) => {
                println!("ok     {name}");
                passed += 1;
            }
            Err(e) => {
                println!("FAILED {name}\n{e}");
                failed += 1;
            }
        }
    }
    println!("sqllogictest: {passed} passed, {failed} failed");
    if failed > 0 || files.is_empty() {
        std::process::exit(1);
    }
}
