"""A small app on psycopg 3 against a Hyperdrive config (or any PostgreSQL).

    DATABASE_URL="$(hd hyperdrive get my-db --connection-string)" python examples/psycopg_app.py
    python examples/psycopg_app.py postgresql://…        # or the URL as the argument

The connection string is the ordinary one: `sslmode=verify-full` with the edge's CA as `sslrootcert`,
so libpq checks the edge's certificate and host name before sending the password. Server-side
prepared statements work through the proxy's transaction pooling, so `prepare_threshold` may be
left as is or lowered; here every statement is prepared (`prepare_threshold=0`).
"""

from __future__ import annotations

import os
import sys

import psycopg


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DATABASE_URL")
    if not url:
        print("usage: psycopg_app.py DATABASE_URL (or set DATABASE_URL)", file=sys.stderr)
        return 2
    with psycopg.connect(url, prepare_threshold=0, connect_timeout=15, autocommit=True) as conn:
        version = conn.execute("show server_version").fetchone()[0]
        print(f"connected to PostgreSQL {version}")
        print("1 + 1 = {}".format(conn.execute("select %s::int + %s::int", (1, 1)).fetchone()[0]))

        conn.execute("""create table if not exists notes (
                            id bigserial primary key,
                            body text not null,
                            created_at timestamptz not null default now())""")

        # A transaction that is rolled back leaves nothing behind.
        with conn.transaction() as tx:
            conn.execute("insert into notes (body) values (%s)", ("never saved (psycopg)",))
            raise psycopg.Rollback(tx)
        n = conn.execute("select count(*) from notes where body = %s", ("never saved (psycopg)",)).fetchone()[0]
        print(f"rolled back: {n} rows")

        with conn.transaction():
            note_id = conn.execute("insert into notes (body) values (%s) returning id",
                                   ("hello from psycopg",)).fetchone()[0]
        total = conn.execute("select count(*) from notes").fetchone()[0]
        latest = conn.execute("select id, body from notes order by id desc limit 3").fetchall()
        print(f"notes: {total} in total, just added #{note_id}")
        for row_id, body in latest:
            print(f"  #{row_id}: {body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
