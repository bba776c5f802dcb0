#!/usr/bin/env python3
"""Query protocols side by side on one running `rivulet serve`: HTTP JSON, HTTP Arrow IPC,
Arrow Flight (InfluxDB 3 ticket) and the Postgres wire protocol, same query, same run.

  pip install pyarrow 'psycopg[binary]' requests
  python3 benches/protocols.py --url http://127.0.0.1:8181 --pg 'host=127.0.0.1 port=5433 dbname=main user=bench'

Two measurements per protocol:
  - a dashboard query (TSBS double-groupby-1 on the loaded day): median wall time of --runs,
    result fully received (and decoded where the client decodes in C: Arrow, libpq);
  - a 1,000,000-row result (every column of `cpu`): rows per second, median of --big-runs.
Clients read at C speed so the server is what is measured: HTTP bodies in 1 MiB chunks (JSON is
not parsed), Arrow decoded by pyarrow, Flight by pyarrow.flight, Postgres by libpq
(psycopg's `pgconn.exec_`, binary-free text results, no Python row objects).
"""
import argparse
import statistics
import time

import psycopg
import pyarrow as pa
import pyarrow.flight as flight
import requests

DOUBLE_GROUPBY = (
    "SELECT hostname, CAST(extract(epoch FROM date_bin(INTERVAL '1 hour', time, "
    "TIMESTAMP '1970-01-01')) AS BIGINT) AS t, avg(usage_user) FROM cpu "
    "WHERE time >= TIMESTAMP '2024-01-01 06:00:00' AND time < TIMESTAMP '2024-01-01 18:00:00' "
    "GROUP BY 1, 2 ORDER BY 1, 2"
)
BIG = "SELECT * FROM cpu CROSS JOIN (VALUES (1), (2)) AS v(k) LIMIT 1000000"


def http(url, db, sql, fmt):
    with requests.get(f"{url}/api/v3/query_sql", params={"db": db, "q": sql, "format": fmt},
                      stream=True, timeout=600) as r:
        r.raise_for_status()
        if fmt == "arrow":
            return pa.ipc.open_stream(r.raw).read_all().num_rows
        n = 0
        for chunk in r.iter_content(1 << 20):
            n += len(chunk)
        return n


def flight_query(client, db, sql):
    ticket = flight.Ticket(('{"database": "%s", "sql_query": %s, "query_type": "sql"}'
                            % (db, __import__("json").dumps(sql))).encode())
    return client.do_get(ticket).read_all().num_rows


def pg_query(conn, sql):
    res = conn.pgconn.exec_(sql.encode())
    if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
        raise RuntimeError(res.error_message.decode())
    return res.ntuples


def median_ms(f, runs):
    f()  # warm
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8181")
    ap.add_argument("--pg", default="host=127.0.0.1 port=5433 dbname=main user=bench")
    ap.add_argument("--db", default="main")
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--big-runs", type=int, default=3)
    a = ap.parse_args()
    fc = flight.FlightClient(a.url.replace("http://", "grpc+tcp://"))
    conn = psycopg.connect(a.pg, autocommit=True)
    protocols = {
        "HTTP JSON": lambda sql: http(a.url, a.db, sql, "json"),
        "HTTP Arrow": lambda sql: http(a.url, a.db, sql, "arrow"),
        "Flight": lambda sql: flight_query(fc, a.db, sql),
        "pgwire": lambda sql: pg_query(conn, sql),
    }
    print(f"| protocol | double-groupby-1 median ms ({a.runs} runs) | 1M rows: median s | rows/s |")
    print("|---|---:|---:|---:|")
    for name, q in protocols.items():
        small = median_ms(lambda: q(DOUBLE_GROUPBY), a.runs)
        big = median_ms(lambda: q(BIG), a.big_runs) / 1000
        print(f"| {name} | {small:.2f} | {big:.2f} | {1_000_000 / big:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
