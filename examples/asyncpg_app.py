"""A small app on asyncpg against a Hyperdrive config (or any PostgreSQL).

    DATABASE_URL="$(hd hyperdrive get my-db --connection-string)" python examples/asyncpg_app.py
    python examples/asyncpg_app.py postgresql://…        # or the URL as the argument

TLS: the connection string says `sslmode=verify-full&sslrootcert=<the edge's CA>`; asyncpg reads
both from the URL, so it checks the edge's certificate and host name. asyncpg prepares every
statement on the server: that works through the proxy's transaction pooling as it is.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg


async def run(url: str) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4, timeout=15)
    try:
        async with pool.acquire() as conn:
            version = await conn.fetchval("show server_version")
            print(f"connected to PostgreSQL {version}")
            print(f"1 + 1 = {await conn.fetchval('select $1::int + $2::int', 1, 1)}")

            await conn.execute("""create table if not exists notes (
                                      id bigserial primary key,
                                      body text not null,
                                      created_at timestamptz not null default now())""")

            # A transaction that is rolled back leaves nothing behind.
            tx = conn.transaction()
            await tx.start()
            await conn.execute("insert into notes (body) values ($1)", "never saved (asyncpg)")
            await tx.rollback()
            n = await conn.fetchval("select count(*) from notes where body = $1", "never saved (asyncpg)")
            print(f"rolled back: {n} rows")

            async with conn.transaction():
                note_id = await conn.fetchval("insert into notes (body) values ($1) returning id", "hello from asyncpg")

        # A few queries at once, each on a pooled connection.
        counts = await asyncio.gather(*(pool.fetchval("select count(*) from notes where id <= $1", note_id)
                                        for _ in range(4)))
        latest = await pool.fetch("select id, body from notes order by id desc limit 3")
        print(f"notes: {counts[0]} in total, just added #{note_id}")
        for row in latest:
            print(f"  #{row['id']}: {row['body']}")
    finally:
        await pool.close()


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DATABASE_URL")
    if not url:
        print("usage: asyncpg_app.py DATABASE_URL (or set DATABASE_URL)", file=sys.stderr)
        return 2
    asyncio.run(run(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
