//! Execution plans over segment files: the Parquet scan queries use (projection, row-group and
//! page pruning by the query's filters) and the sorted merge compaction uses.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::SortOptions;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_expr::expressions::col;
use datafusion::physical_expr::{LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;

use crate::storage::buffer::project_batch;
use crate::storage::catalog::{TIME_COLUMN, TableSchema};
use crate::storage::hot::HotSegment;
use crate::storage::layout;
use crate::storage::segment::Segment;

/// A file of the scan, holding its segment alive (and its file undeleted) while the plan
/// exists. Read through the data directory's store ([`layout::store_url`]).
fn file(segment: &Arc<Segment>) -> Result<PartitionedFile> {
    let location = segment
        .location()
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    // `location` holds only characters object-store paths keep as they are, so it reads back
    // verbatim.
    Ok(
        PartitionedFile::new(location.to_string(), segment.meta.bytes)
            .with_extension(segment.clone()),
    )
}

/// Scans `segments` (projected onto `projection` of the table schema), spreading them over
/// `partitions` file groups; `predicate` prunes row groups and pages. Files are opened through
/// `runtime`'s file metadata cache: a segment never changes, so its footer and page index are
/// parsed once, not by every query.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan(
    runtime: &RuntimeEnv,
    schema: &TableSchema,
    segments: &[Arc<Segment>],
    projection: &[usize],
    predicate: Option<Arc<dyn PhysicalExpr>>,
    partitions: usize,
    pushdown: bool,
    sort_key: &[Arc<str>],
) -> Result<Arc<dyn ExecutionPlan>> {
    let store = runtime.object_store(layout::store_url()?)?;
    let mut source = ParquetSource::new(schema.arrow().clone()).with_parquet_file_reader_factory(
        Arc::new(CachedParquetFileReaderFactory::new(
            store,
            runtime.cache_manager.get_file_metadata_cache(),
        )),
    );
    if let Some(p) = predicate {
        // With `pushdown`, filters are also applied while decoding (late materialization):
        // columns other than the filtered ones are only decoded for the rows that pass.
        source = source
            .with_predicate(p)
            .with_pushdown_filters(pushdown)
            .with_reorder_filters(pushdown);
    }
    // A few files: one per group, with their sort order declared (each file is sorted by the
    // sort key then time), so aggregations over a sort-key prefix can stream. Many files: spread
    // round-robin (a group of several files has no order).
    let (ordered, n) = grouping(segments.len(), partitions);
    let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n];
    for (i, s) in segments.iter().enumerate() {
        groups[i % n].push(file(s)?);
    }
    let mut builder = FileScanConfigBuilder::new(layout::store_url()?, Arc::new(source))
        .with_file_groups(groups.into_iter().map(FileGroup::new).collect());
    if ordered && let Some(order) = ordering(schema, sort_key)? {
        builder = builder.with_output_ordering(vec![order]);
    }
    let config = builder
        .with_projection_indices(Some(projection.to_vec()))?
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

/// Scans decoded segments of the hot cache like [`scan`] scans files: the slices `predicate`
/// rules out by their statistics are skipped, the rest projected onto `projection`; up to
/// [`MAX_ORDERED_FILES`] segments one per partition with their sort order declared.
pub(crate) fn hot_scan(
    schema: &TableSchema,
    segments: &[Arc<HotSegment>],
    projection: &[usize],
    predicate: Option<Arc<dyn PhysicalExpr>>,
    partitions: usize,
    sort_key: &[Arc<str>],
) -> Result<Arc<dyn ExecutionPlan>> {
    let pruning = predicate.and_then(|p| {
        PruningPredicateBuilder::new()
            .with_file_schema(schema.arrow().clone())
            .try_build(p)
            .ok()
            .filter(|p| !p.always_true())
    });
    let out_schema = Arc::new(schema.arrow().project(projection)?);
    let (ordered, n) = grouping(segments.len(), partitions);
    let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
    for (i, hot) in segments.iter().enumerate() {
        let keep = match &pruning {
            // A statistic that cannot be evaluated keeps every slice.
            Some(p) => p.prune(hot.as_ref()).ok(),
            None => None,
        };
        for b in hot.batches(keep.as_deref()) {
            parts[i % n].push(project_batch(&b, schema, projection, &out_schema)?);
        }
    }
    let mut source = MemorySourceConfig::try_new(&parts, out_schema.clone(), None)?;
    if ordered && let Some(order) = ordering_of(&out_schema, sort_key)? {
        source = source.try_with_sort_information(vec![order])?;
    }
    Ok(DataSourceExec::from_data_source(source))
}

/// Whether `segments` segments are scanned one per partition with their order declared, and
/// how many partitions they are spread over.
fn grouping(segments: usize, partitions: usize) -> (bool, usize) {
    let ordered = segments <= MAX_ORDERED_FILES;
    let n = if ordered {
        segments.max(1)
    } else {
        partitions.max(1).min(segments.max(1))
    };
    (ordered, n)
}

/// Up to this many segment files are scanned one per partition with their order declared.
const MAX_ORDERED_FILES: usize = 8;

/// The sort order of segment rows: the sort key's tags then `time`, ascending, nulls first.
pub(crate) fn ordering(schema: &TableSchema, sort_key: &[Arc<str>]) -> Result<Option<LexOrdering>> {
    ordering_of(schema.arrow(), sort_key)
}

/// [`ordering`] over the columns of `arrow` (a table schema or a projection of it).
fn ordering_of(arrow: &SchemaRef, sort_key: &[Arc<str>]) -> Result<Option<LexOrdering>> {
    let options = SortOptions {
        descending: false,
        nulls_first: true,
    };
    let mut exprs = Vec::new();
    for name in sort_key.iter().map(|s| s.as_ref()).chain([TIME_COLUMN]) {
        if arrow.index_of(name).is_err() {
            // A key column this (planning-time) schema lacks: files are sorted by it, so the
            // declared order stops here (later columns are only sorted within it).
            break;
        }
        exprs.push(PhysicalSortExpr::new(col(name, arrow)?, options));
    }
    Ok(LexOrdering::new(exprs))
}

/// Merges sorted segments (whose rows never share a series and time) into one sorted stream,
/// one Parquet scan per segment.
pub(crate) fn merge_plan(
    schema: &TableSchema,
    sort_key: &[Arc<str>],
    segments: &[Arc<Segment>],
) -> Result<Arc<dyn ExecutionPlan>> {
    let ordering = ordering(schema, sort_key)?
        .ok_or_else(|| DataFusionError::Internal("a table has a time column".to_string()))?;
    let source = ParquetSource::new(schema.arrow().clone());
    let groups = segments
        .iter()
        .map(|s| Ok(FileGroup::new(vec![file(s)?])))
        .collect::<Result<Vec<_>>>()?;
    let config = FileScanConfigBuilder::new(layout::store_url()?, Arc::new(source))
        .with_file_groups(groups)
        .with_output_ordering(vec![ordering.clone()])
        .build();
    let scan = DataSourceExec::from_data_source(config);
    Ok(Arc::new(SortPreservingMergeExec::new(ordering, scan)))
}
