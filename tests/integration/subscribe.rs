//! Embedded subscriptions (`Db::subscribe`): a client applying the snapshot and the changes
//! holds exactly the query's result at every sequence; resume without gap or duplicate (also
//! across a restart); reset when too old; conflation and `lagged` for slow subscribers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::StreamExt;
use rivulet::{
    ChangeBatch, ChangeKind, Config, Db, Durability, Op, Precision, SubscribeOptions, Subscription,
};

const MIN: i64 = 60_000_000_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn memory() -> Db {
    Db::open_with(Config {
        durability: Durability::None,
        ..Config::default()
    })
    .expect("open")
}

fn fast(since: Option<u64>) -> SubscribeOptions {
    SubscribeOptions {
        since,
        progress_interval: Duration::from_millis(20),
        ..SubscribeOptions::default()
    }
}

/// Each row as text cells.
fn rows(batch: &RecordBatch) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let formatters: Vec<ArrayFormatter> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
        .collect();
    (0..batch.num_rows())
        .map(|r| formatters.iter().map(|f| f.value(r).to_string()).collect())
        .collect()
}

/// A client's copy of a keyed result: key cells → row.
#[derive(Default, Debug, PartialEq)]
struct Client {
    rows: BTreeMap<Vec<String>, Vec<String>>,
    appended: Vec<Vec<String>>,
    keys: Vec<usize>,
    seq: u64,
    /// A whole snapshot arrived (or the client resumes).
    ready: bool,
}

impl Client {
    fn keyed(keys: Vec<usize>) -> Client {
        Client {
            keys,
            ..Client::default()
        }
    }

    fn apply(&mut self, m: &ChangeBatch) {
        if let ChangeKind::Snapshot { first: true, .. } = m.kind {
            self.rows.clear();
            self.appended.clear();
        }
        if m.kind == ChangeKind::Change {
            assert!(m.seq > self.seq, "change {} after {}", m.seq, self.seq);
        }
        for (i, row) in rows(&m.rows).into_iter().enumerate() {
            let key: Vec<String> = self.keys.iter().map(|&k| row[k].clone()).collect();
            match m.ops[i] {
                Op::Insert => self.appended.push(row),
                Op::Upsert => {
                    self.rows.insert(key, row);
                }
                Op::Delete => {
                    self.rows.remove(&key);
                }
            }
        }
        if !matches!(
            m.kind,
            ChangeKind::Snapshot { last: false, .. } | ChangeKind::Reset
        ) {
            self.seq = self.seq.max(m.seq);
        }
        if let ChangeKind::Snapshot { last: true, .. } = m.kind {
            self.ready = true;
        }
        if m.kind == ChangeKind::Reset {
            self.ready = false;
        }
    }
}

/// Takes messages until the client is at `seq` or later.
async fn catch_up(sub: &mut Subscription, client: &mut Client, seq: u64) -> Vec<ChangeBatch> {
    let mut seen = Vec::new();
    while client.seq < seq || !client.ready {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("a message within 30 s")
            .expect("the stream goes on")
            .expect("no error");
        client.apply(&m);
        seen.push(m);
    }
    seen
}

/// Rows of the snapshot that comes next.
async fn snapshot_rows(sub: &mut Subscription) -> usize {
    let mut n = 0;
    let mut first = true;
    loop {
        let m = sub.next().await.expect("message").expect("ok");
        let ChangeKind::Snapshot { first: f, last } = m.kind else {
            panic!("not a snapshot: {m:?}");
        };
        assert_eq!(f, first);
        first = false;
        n += m.rows.num_rows();
        if last {
            return n;
        }
    }
}

async fn result(db: &Db, sql: &str, keys: &[usize]) -> BTreeMap<Vec<String>, Vec<String>> {
    let batches = db.sql(sql).await.expect(sql);
    let mut out = BTreeMap::new();
    for b in &batches {
        for row in rows(b) {
            out.insert(keys.iter().map(|&k| row[k].clone()).collect(), row);
        }
    }
    out
}

#[test]
fn a_view_subscriber_holds_the_view_at_every_sequence() {
    let rt = rt();
    let db = memory();
    db.write_lines("main", "cpu,host=h0 u=1 0", Precision::Nanosecond)
        .expect("write");
    rt.block_on(async {
        db.sql(
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
             host, avg(u) AS avg_u, max(u) AS max_u, count(*) AS n FROM cpu GROUP BY 1, 2",
        )
        .await
        .expect("create");
        let mut sub = db
            .subscribe("SELECT * FROM cpu_1m", fast(None))
            .await
            .expect("subscribe");
        let names: Vec<String> = sub.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["time", "host", "avg_u", "max_u", "n"]);
        let mut client = Client::keyed(vec![0, 1]);
        catch_up(&mut sub, &mut client, 0).await;
        // A deterministic mix: new minutes, out of order points, overwrites, many hosts.
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as i64
        };
        for step in 0..40 {
            let mut lines = String::new();
            for _ in 0..(1 + next() % 6) {
                let host = next() % 4;
                let minute = next() % 8;
                let second = next() % 3;
                lines.push_str(&format!(
                    "cpu,host=h{host} u={} {}\n",
                    next() % 100,
                    minute * MIN + second * 1_000_000_000
                ));
            }
            let receipt = db
                .write_lines("main", &lines, Precision::Nanosecond)
                .expect("write");
            db.sync_views().expect("sync");
            let at = db.last_seq().max(receipt.seq);
            let seen = catch_up(&mut sub, &mut client, at).await;
            assert!(
                seen.iter().all(|m| matches!(m.kind, ChangeKind::Change | ChangeKind::Progress)),
                "{seen:?}"
            );
            let want = result(&db, "SELECT * FROM cpu_1m", &[0, 1]).await;
            assert_eq!(client.rows, want, "after step {step} (seq {at})");
        }
    });
    db.close().expect("close");
}

#[test]
fn a_filtered_table_stream_gets_the_matching_rows_once() {
    let rt = rt();
    let db = memory();
    db.write_lines(
        "main",
        "cpu,host=a usage=95 1\ncpu,host=b usage=10 1",
        Precision::Second,
    )
    .expect("write");
    rt.block_on(async {
        let mut sub = db
            .subscribe(
                "SELECT time, host, usage FROM cpu WHERE usage > 90",
                fast(None),
            )
            .await
            .expect("subscribe");
        let mut client = Client::default();
        catch_up(&mut sub, &mut client, 1).await;
        assert_eq!(client.appended.len(), 1, "snapshot: {:?}", client.appended);
        let mut expected = 1;
        for i in 2..30 {
            let r = db
                .write_lines(
                    "main",
                    &format!("cpu,host=a usage={} {i}\ncpu,host=b usage=99 {i}", 80 + i),
                    Precision::Second,
                )
                .expect("write");
            expected += 1 + usize::from(80 + i > 90);
            catch_up(&mut sub, &mut client, r.seq).await;
        }
        assert_eq!(client.appended.len(), expected);
        // A write to another table moves the position without changes.
        let r = db
            .write_lines("main", "mem,host=a used=1 5", Precision::Second)
            .expect("write");
        let seen = catch_up(&mut sub, &mut client, r.seq).await;
        assert!(seen.iter().all(|m| m.kind == ChangeKind::Progress));
    });
    db.close().expect("close");
}

#[test]
fn resume_gets_exactly_the_changes_after_the_position() {
    let rt = rt();
    let db = memory();
    rt.block_on(async {
        db.write_lines("main", "cpu,host=a u=1 0", Precision::Second)
            .expect("write");
        let sql = "SELECT * FROM cpu";
        let mut sub = db.subscribe(sql, fast(None)).await.expect("subscribe");
        let mut client = Client::default();
        catch_up(&mut sub, &mut client, 1).await;
        let r = db
            .write_lines("main", "cpu,host=a u=2 1", Precision::Second)
            .expect("write");
        catch_up(&mut sub, &mut client, r.seq).await;
        let position = sub.position();
        drop(sub);
        // Written while disconnected.
        let mut last = 0;
        for i in 2..6 {
            last = db
                .write_lines("main", &format!("cpu,host=a u={i} {i}"), Precision::Second)
                .expect("write")
                .seq;
        }
        let mut sub = db
            .subscribe(sql, fast(Some(position)))
            .await
            .expect("resume");
        let seen = catch_up(&mut sub, &mut client, last).await;
        assert!(
            seen.iter()
                .all(|m| !matches!(m.kind, ChangeKind::Snapshot { .. } | ChangeKind::Reset))
        );
        let values: Vec<String> = client.appended.iter().map(|r| r[2].clone()).collect();
        assert_eq!(values, ["1.0", "2.0", "2.0", "3.0", "4.0", "5.0"]);
        // A position ahead of the source, or one the log no longer has: reset and snapshot.
        let mut sub = db
            .subscribe(sql, fast(Some(last + 1000)))
            .await
            .expect("subscribe");
        let m = sub.next().await.expect("message").expect("ok");
        assert_eq!(m.kind, ChangeKind::Reset);
        assert_eq!(snapshot_rows(&mut sub).await, 6);
    });
    db.close().expect("close");
}

#[test]
fn an_old_position_gets_a_reset_and_a_snapshot() {
    let rt = rt();
    let db = Db::open_with(Config {
        durability: Durability::None,
        subscribe_log_bytes: 1,
        ..Config::default()
    })
    .expect("open");
    rt.block_on(async {
        let sql = "SELECT * FROM cpu";
        db.write_lines("main", "cpu,host=a u=0 0", Precision::Second)
            .expect("write");
        let sub = db.subscribe(sql, fast(None)).await.expect("subscribe");
        let position = sub.position();
        drop(sub);
        // The log keeps one entry only.
        for i in 1..5 {
            db.write_lines("main", &format!("cpu,host=a u={i} {i}"), Precision::Second)
                .expect("write");
        }
        let mut sub = db
            .subscribe(sql, fast(Some(position)))
            .await
            .expect("resume");
        let m = sub.next().await.expect("message").expect("ok");
        assert_eq!(m.kind, ChangeKind::Reset, "{m:?}");
        assert!(
            m.reason.as_deref().unwrap_or("").contains("older"),
            "{:?}",
            m.reason
        );
        assert_eq!(snapshot_rows(&mut sub).await, 5);
    });
    db.close().expect("close");
}

#[test]
fn slow_subscribers_are_conflated_or_lagged_and_never_slow_ingest() {
    let rt = rt();
    let db = memory();
    db.write_lines("main", "cpu,host=h0 u=1 0", Precision::Nanosecond)
        .expect("write");
    rt.block_on(async {
        db.sql(
            "CREATE MATERIALIZED VIEW last_u AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
             host, max(u) AS top FROM cpu GROUP BY 1, 2",
        )
        .await
        .expect("create");
        let queue = SubscribeOptions {
            queue_len: 2,
            ..fast(None)
        };
        let mut keyed = db.subscribe("SELECT * FROM last_u", queue.clone()).await.expect("keyed");
        let mut append = db.subscribe("SELECT * FROM cpu", queue).await.expect("append");
        let mut kc = Client::keyed(vec![0, 1]);
        let mut ac = Client::default();
        catch_up(&mut keyed, &mut kc, 0).await;
        catch_up(&mut append, &mut ac, 0).await;
        // Neither subscriber reads while 50 writes go in (each its own view round).
        for i in 1..=50i64 {
            db.write_lines("main", &format!("cpu,host=h{} u={i} {}", i % 3, i * 1000), Precision::Nanosecond)
                .expect("write");
            db.sync_views().expect("sync");
        }
        let at = db.last_seq();
        let seen = catch_up(&mut keyed, &mut kc, at).await;
        let changes = seen.iter().filter(|m| m.kind == ChangeKind::Change).count();
        assert_eq!(changes, 1, "conflated into one change: {seen:?}");
        assert_eq!(kc.rows, result(&db, "SELECT * FROM last_u", &[0, 1]).await);
        // The append subscriber is told where to resume, then closed.
        let m = append.next().await.expect("message").expect("ok");
        assert_eq!(m.kind, ChangeKind::Lagged, "{m:?}");
        assert!(append.next().await.is_none());
        let resume = m.seq;
        let mut again = db.subscribe("SELECT * FROM cpu", fast(Some(resume))).await.expect("resume");
        catch_up(&mut again, &mut ac, at).await;
        assert_eq!(ac.appended.len(), 51);
    });
    db.close().expect("close");
}

#[test]
fn queries_that_cannot_be_kept_current_are_refused_with_the_reason() {
    let rt = rt();
    let db = memory();
    db.write_lines("main", "cpu,host=a u=1 0", Precision::Second)
        .expect("write");
    rt.block_on(async {
        db.sql("CREATE MATERIALIZED VIEW v AS SELECT date_bin(INTERVAL '1 minute', time) AS time, host, max(u) AS m FROM cpu GROUP BY 1, 2")
            .await
            .expect("create");
        for (sql, reason) in [
            ("SELECT host, max(u) FROM cpu GROUP BY host ORDER BY host", "ORDER BY"),
            ("SELECT * FROM cpu ORDER BY time", "ORDER BY"),
            ("SELECT * FROM cpu LIMIT 3", "LIMIT"),
            ("SELECT m FROM v", "key columns (time, host)"),
            ("SELECT * FROM nope", "nope"),
            ("DROP MATERIALIZED VIEW v", "statements"),
        ] {
            let e = db
                .subscribe(sql, SubscribeOptions::default())
                .await
                .expect_err(sql)
                .to_string();
            assert!(e.contains(reason), "{sql}: {e}");
        }
    });
    db.close().expect("close");
}

#[test]
fn an_aggregate_query_is_kept_current_by_one_shared_view() {
    let rt = rt();
    let db = memory();
    db.write_lines(
        "main",
        "cpu,host=a u=1 0\ncpu,host=b u=2 0",
        Precision::Second,
    )
    .expect("write");
    let sql = "SELECT host, max(u) AS top, count(*) AS n FROM cpu GROUP BY host";
    rt.block_on(async {
        let mut first = db.subscribe(sql, fast(None)).await.expect("subscribe");
        let mut second = db.subscribe(sql, fast(None)).await.expect("subscribe");
        let mut a = Client::keyed(vec![0]);
        let mut b = Client::keyed(vec![0]);
        catch_up(&mut first, &mut a, 0).await;
        catch_up(&mut second, &mut b, 0).await;
        assert_eq!(a.rows.len(), 2);
        for i in 1..10 {
            let r = db
                .write_lines(
                    "main",
                    &format!("cpu,host=h{} u={i} {i}", i % 3),
                    Precision::Second,
                )
                .expect("write");
            db.sync_views().expect("sync");
            let at = db.last_seq().max(r.seq);
            catch_up(&mut first, &mut a, at).await;
            catch_up(&mut second, &mut b, at).await;
            let want = result(&db, sql, &[0]).await;
            assert_eq!(a.rows, want, "after write {i}");
            assert_eq!(b.rows, want, "after write {i}");
        }
        // One internal view serves both, and it is not a user view.
        assert_eq!(db.subscription_views(), 1);
        let views = db
            .sql("SELECT count(*) FROM system.views")
            .await
            .expect("views");
        assert_eq!(rows(&views[0]), [["0"]]);
        // The same query laid out differently shares it too.
        let _third = db
            .subscribe(
                "select host, max(u) as top, count(*) as n\n  from cpu group by host;",
                fast(None),
            )
            .await
            .expect("subscribe");
        assert_eq!(db.subscription_views(), 1);
    });
    db.close().expect("close");
}

#[test]
fn idle_shared_views_are_dropped_on_a_timer() {
    // Nobody subscribes again: the collector, not the next subscription, drops the view after
    // its grace period; a user view whose name looks like one is not touched.
    let rt = rt();
    let db = Db::open_with(Config {
        durability: Durability::None,
        shared_view_grace: Duration::from_millis(50),
        ..Config::default()
    })
    .expect("open");
    db.write_lines("main", "cpu,host=a u=1 1", Precision::Second)
        .expect("write");
    rt.block_on(async {
        db.sql(
            "CREATE MATERIALIZED VIEW rivulet_sub_0123456789abcdef AS \
             SELECT host, count(*) AS n FROM cpu GROUP BY host",
        )
        .await
        .expect("a user view");
        let sub = db
            .subscribe(
                "SELECT host, max(u) AS top FROM cpu GROUP BY host",
                fast(None),
            )
            .await
            .expect("subscribe");
        assert_eq!(db.subscription_views(), 1);
        drop(sub);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while db.subscription_views() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle shared view was not dropped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let user = db
            .sql("SELECT name FROM system.views")
            .await
            .expect("views");
        assert_eq!(rows(&user[0]), [["rivulet_sub_0123456789abcdef"]]);
    });
    db.close().expect("close");
}

#[test]
fn subscription_views_are_a_reserved_namespace_that_does_not_outlive_a_restart() {
    let rt = rt();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || Config {
        data_dir: Some(dir.path().to_path_buf()),
        durability: Durability::None,
        background: false,
        ..Config::default()
    };
    let db = Db::open_with(config()).expect("open");
    db.write_lines("main", "cpu,host=a u=1 1", Precision::Second)
        .expect("write");
    rt.block_on(async {
        let _sub = db
            .subscribe("SELECT host, max(u) AS top FROM cpu GROUP BY host", fast(None))
            .await
            .expect("subscribe");
        assert_eq!(db.subscription_views(), 1);
        for sql in [
            "CREATE MATERIALIZED VIEW __rivulet_sub_00 AS SELECT host, count(*) AS n FROM cpu GROUP BY host",
            "DROP MATERIALIZED VIEW __rivulet_sub_00",
            "DROP MATERIALIZED VIEW IF EXISTS \"__rivulet_sub_00\"",
        ] {
            let e = db.sql(sql).await.expect_err(sql).to_string();
            assert!(e.contains("reserved"), "{sql}: {e}");
        }
        // Not listed, not readable.
        let tables = db
            .sql("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%sub%'")
            .await
            .expect("tables");
        assert_eq!(rows(&tables[0]), [["0"]]);
    });
    db.close().expect("close");
    let db = Db::open_with(config()).expect("reopen");
    db.sync_views().expect("sync");
    assert_eq!(db.subscription_views(), 0);
    rt.block_on(async {
        let views = db
            .sql("SELECT count(*) FROM system.views")
            .await
            .expect("views");
        assert_eq!(rows(&views[0]), [["0"]]);
        // Subscribing again makes it anew and it is current.
        let mut sub = db
            .subscribe(
                "SELECT host, max(u) AS top FROM cpu GROUP BY host",
                fast(None),
            )
            .await
            .expect("subscribe after reopen");
        let mut c = Client::keyed(vec![0]);
        catch_up(&mut sub, &mut c, 0).await;
        assert_eq!(c.rows.len(), 1);
    });
    assert_eq!(db.subscription_views(), 1);
    db.close().expect("close");
}

#[test]
fn subscription_views_are_capped_counting_those_in_their_grace_period() {
    let rt = rt();
    let db = Db::open_with(Config {
        durability: Durability::None,
        max_shared_views: 2,
        shared_view_grace: Duration::from_millis(100),
        ..Config::default()
    })
    .expect("open");
    db.write_lines("main", "cpu,host=a u=1 1", Precision::Second)
        .expect("write");
    let query = |agg: &str| format!("SELECT host, {agg}(u) AS x FROM cpu GROUP BY host");
    rt.block_on(async {
        let a = db
            .subscribe(&query("max"), fast(None))
            .await
            .expect("first");
        let b = db
            .subscribe(&query("min"), fast(None))
            .await
            .expect("second");
        let e = db
            .subscribe(&query("sum"), fast(None))
            .await
            .expect_err("a third distinct query is over the cap");
        assert!(
            matches!(
                e,
                rivulet::Error::Subscribe(rivulet::SubscribeError::TooMany(_))
            ),
            "{e}"
        );
        let text = e.to_string();
        assert!(text.contains("--max-shared-views"), "{text}");
        // A query already served shares its view: no new one.
        let _again = db
            .subscribe(&query("max"), fast(None))
            .await
            .expect("shared");
        // Left, but in its grace period: still counted.
        drop(b);
        let e = db
            .subscribe(&query("sum"), fast(None))
            .await
            .expect_err("the left view is in its grace period");
        assert!(e.to_string().contains("--max-shared-views"), "{e}");
        // Once the grace period is over the slot is free (the collector runs on a timer).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while db.subscription_views() > 1 {
            assert!(std::time::Instant::now() < deadline, "not dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _c = db
            .subscribe(&query("sum"), fast(None))
            .await
            .expect("room again");
        drop(a);
    });
    db.close().expect("close");
}

#[test]
fn on_window_close_sends_only_final_windows() {
    let rt = rt();
    let db = memory();
    db.write_lines("main", "cpu,host=a u=1 0", Precision::Nanosecond)
        .expect("write");
    rt.block_on(async {
        db.sql(
            "CREATE MATERIALIZED VIEW w WITH (emit = 'on_window_close') AS \
             SELECT date_bin(INTERVAL '1 minute', time) AS time, host, count(*) AS n FROM cpu GROUP BY 1, 2",
        )
        .await
        .expect("create");
        let mut sub = db.subscribe("SELECT * FROM w", fast(None)).await.expect("subscribe");
        let mut client = Client::keyed(vec![0, 1]);
        catch_up(&mut sub, &mut client, 0).await;
        // Minute 0 is open until a point at or after minute 1 arrives.
        assert!(client.rows.is_empty(), "{:?}", client.rows);
        let r = db.write_lines("main", "cpu,host=a u=2 30000000000", Precision::Nanosecond).expect("write");
        db.sync_views().expect("sync");
        catch_up(&mut sub, &mut client, r.seq).await;
        assert!(client.rows.is_empty(), "{:?}", client.rows);
        let r = db.write_lines("main", "cpu,host=a u=3 60000000000", Precision::Nanosecond).expect("write");
        db.sync_views().expect("sync");
        catch_up(&mut sub, &mut client, db.last_seq().max(r.seq)).await;
        let rows: Vec<&Vec<String>> = client.rows.values().collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0][2], "2");
        // With on_change (the default), rows carry whether their window is final.
        db.sql("CREATE MATERIALIZED VIEW c AS SELECT date_bin(INTERVAL '1 minute', time) AS time, host, count(*) AS n FROM cpu GROUP BY 1, 2")
            .await
            .expect("create");
        let mut sub = db.subscribe("SELECT * FROM c", fast(None)).await.expect("subscribe");
        let m = sub.next().await.expect("message").expect("ok");
        let finals = m.finals.expect("final flags");
        assert_eq!(finals.iter().filter(|f| **f).count(), 1);
        assert_eq!(finals.len(), 2);
    });
    db.close().expect("close");
}

#[test]
fn view_subscribers_resume_across_a_restart() {
    let rt = rt();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || Config {
        durability: Durability::None,
        background: false,
        ..Config::with_dir(dir.path())
    };
    let sql = "SELECT * FROM cpu_1m WHERE host = 'a'";
    let (position, mut client) = {
        let db = Db::open_with(config()).expect("open");
        db.write_lines(
            "main",
            "cpu,host=a u=1 0\ncpu,host=b u=1 0",
            Precision::Nanosecond,
        )
        .expect("write");
        let out = rt.block_on(async {
            db.sql(
                "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
                 host, sum(u) AS total FROM cpu GROUP BY 1, 2",
            )
            .await
            .expect("create");
            let mut sub = db.subscribe(sql, fast(None)).await.expect("subscribe");
            let mut client = Client::keyed(vec![0, 1]);
            catch_up(&mut sub, &mut client, 0).await;
            let r = db.write_lines("main", "cpu,host=a u=5 1", Precision::Nanosecond).expect("write");
            db.sync_views().expect("sync");
            catch_up(&mut sub, &mut client, db.last_seq().max(r.seq)).await;
            (sub.position(), client)
        });
        // Written after the client went away, before the restart.
        db.write_lines(
            "main",
            "cpu,host=a u=10 2\ncpu,host=a u=7 60000000000",
            Precision::Nanosecond,
        )
        .expect("write");
        db.sync_views().expect("sync");
        db.close().expect("close");
        out
    };
    let db = Db::open_with(config()).expect("reopen");
    db.write_lines(
        "main",
        "cpu,host=a u=100 60000000001",
        Precision::Nanosecond,
    )
    .expect("write");
    db.sync_views().expect("sync");
    rt.block_on(async {
        let mut sub = db
            .subscribe(sql, fast(Some(position)))
            .await
            .expect("resume");
        let seen = catch_up(&mut sub, &mut client, db.last_seq()).await;
        assert!(
            seen.iter()
                .all(|m| !matches!(m.kind, ChangeKind::Reset | ChangeKind::Snapshot { .. })),
            "{seen:?}"
        );
        assert_eq!(client.rows, result(&db, sql, &[0, 1]).await);
        let totals: Vec<&String> = client.rows.values().map(|r| &r[2]).collect();
        assert_eq!(totals, ["16.0", "107.0"]);
    });
    db.close().expect("close");
}

#[test]
fn many_subscribers_share_one_pipeline() {
    let rt = rt();
    let db = Arc::new(memory());
    db.write_lines("main", "cpu,host=a u=1 0", Precision::Second)
        .expect("write");
    rt.block_on(async {
        let mut subs = Vec::new();
        for i in 0..1000 {
            // Two distinct queries: per-subscriber filters on one source.
            let sql = if i % 2 == 0 {
                "SELECT * FROM cpu"
            } else {
                "SELECT * FROM cpu WHERE u > 5"
            };
            subs.push(db.subscribe(sql, fast(None)).await.expect("subscribe"));
        }
        let mut last = 0;
        for i in 1..=10 {
            last = db
                .write_lines("main", &format!("cpu,host=a u={i} {i}"), Precision::Second)
                .expect("write")
                .seq;
        }
        let tasks: Vec<_> = subs
            .into_iter()
            .enumerate()
            .map(|(i, mut sub)| {
                tokio::spawn(async move {
                    let mut client = Client::default();
                    catch_up(&mut sub, &mut client, last).await;
                    (i, client.appended.len())
                })
            })
            .collect();
        for t in tasks {
            let (i, n) = t.await.expect("task");
            assert_eq!(n, if i % 2 == 0 { 11 } else { 5 }, "subscriber {i}");
        }
    });
    assert_eq!(db.stats().subscribers, 0);
}

#[test]
fn dropping_a_view_ends_its_subscriptions_and_snapshot_false_starts_at_now() {
    let rt = rt();
    let db = memory();
    db.write_lines("main", "cpu,host=a u=1 0", Precision::Second)
        .expect("write");
    rt.block_on(async {
        db.sql(
            "CREATE MATERIALIZED VIEW v AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
             host, max(u) AS m FROM cpu GROUP BY 1, 2",
        )
        .await
        .expect("create");
        // No snapshot: the first message is the next change.
        let mut sub = db
            .subscribe(
                "SELECT * FROM v",
                SubscribeOptions {
                    snapshot: false,
                    ..fast(None)
                },
            )
            .await
            .expect("subscribe");
        let start = sub.position();
        assert!(start > 0);
        db.write_lines("main", "cpu,host=b u=2 0", Precision::Second)
            .expect("write");
        let m = loop {
            let m = sub.next().await.expect("message").expect("ok");
            if m.kind != ChangeKind::Progress {
                break m;
            }
        };
        assert_eq!(m.kind, ChangeKind::Change, "{m:?}");
        assert_eq!(rows(&m.rows)[0][1], "b");
        db.sql("DROP MATERIALIZED VIEW v").await.expect("drop");
        let end = loop {
            match sub.next().await {
                Some(Ok(m)) if m.kind == ChangeKind::Progress => continue,
                other => break other,
            }
        };
        let e = end.expect("an error").expect_err("an error").to_string();
        assert!(e.contains("'v' was dropped"), "{e}");
        assert!(sub.next().await.is_none());
    });
    db.close().expect("close");
}

#[test]
fn system_subscriptions_lists_each_open_subscription_until_it_is_dropped() {
    let rt = rt();
    let db = memory();
    db.write_lines("main", "cpu,host=a usage=95 1", Precision::Second)
        .expect("write");
    let listed = |db: &Db| {
        let batches = rt
            .block_on(db.sql(
                "SELECT database, query, source, source_kind, shared_view FROM system.subscriptions ORDER BY id",
            ))
            .expect("system.subscriptions");
        batches.iter().flat_map(rows).collect::<Vec<_>>()
    };
    assert!(listed(&db).is_empty());
    let (table, shared) = rt.block_on(async {
        let mut table = db
            .subscribe(
                "SELECT time, host, usage FROM cpu WHERE usage > 90",
                fast(None),
            )
            .await
            .expect("subscribe");
        snapshot_rows(&mut table).await;
        let mut shared = db
            .subscribe("SELECT host, max(usage) FROM cpu GROUP BY host", fast(None))
            .await
            .expect("subscribe");
        snapshot_rows(&mut shared).await;
        (table, shared)
    });
    let text = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        listed(&db),
        vec![
            text(&[
                "main",
                "SELECT time, host, usage FROM cpu WHERE usage > 90",
                "cpu",
                "table",
                "false"
            ]),
            // Served by an internal view, whose name is not shown.
            text(&[
                "main",
                "SELECT host, max(usage) FROM cpu GROUP BY host",
                "NULL",
                "query",
                "true"
            ]),
        ]
    );
    drop(table);
    assert_eq!(listed(&db).len(), 1);
    drop(shared);
    assert!(listed(&db).is_empty());
    db.close().expect("close");
}
