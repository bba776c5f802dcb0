//! `rivulet sql`: runs one query and prints the result as a table, CSV or JSON.

use std::io::Write;

use arrow::array::RecordBatch;
use rivulet::Db;

use super::{CliResult, DataDirArgs};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
    /// One JSON object per line.
    Jsonl,
}

#[derive(Debug, clap::Args)]
pub(crate) struct SqlArgs {
    #[command(flatten)]
    dir: DataDirArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// The query.
    query: String,
}

pub(crate) fn run(args: SqlArgs) -> CliResult {
    let config = args.dir.config();
    let db = Db::open_with(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let batches = runtime.block_on(db.sql(&args.query))?;
    db.close()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    print(&batches, args.format, &mut out)?;
    out.flush()?;
    Ok(())
}

fn print(batches: &[RecordBatch], format: Format, out: &mut impl Write) -> CliResult {
    match format {
        Format::Table => {
            writeln!(
                out,
                "{}",
                arrow::util::pretty::pretty_format_batches(batches)?
            )?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut *out);
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut *out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            writeln!(out)?;
        }
        Format::Jsonl => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut *out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(())
}
