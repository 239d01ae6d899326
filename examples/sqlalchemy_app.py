"""A small app on SQLAlchemy 2 (ORM, psycopg 3 driver) against a Hyperdrive config.

    DATABASE_URL="$(hd hyperdrive get my-db --connection-string)" python examples/sqlalchemy_app.py
    python examples/sqlalchemy_app.py postgresql://…     # or the URL as the argument

The connection string from `hd hyperdrive` starts with `postgresql://`; SQLAlchemy picks its
driver from the scheme, so we ask for psycopg 3 with `postgresql+psycopg://`. Its query
(`sslmode=verify-full&sslrootcert=…`) goes to libpq as it is: the edge's certificate is verified.
"""

from __future__ import annotations

import datetime
import os
import sys

from sqlalchemy import String, create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DATABASE_URL")
    if not url:
        print("usage: sqlalchemy_app.py DATABASE_URL (or set DATABASE_URL)", file=sys.stderr)
        return 2
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    engine = create_engine(url, pool_size=4, pool_pre_ping=True, connect_args={"connect_timeout": 15})
    try:
        with engine.connect() as conn:
            print(f"connected to PostgreSQL {conn.execute(text('show server_version')).scalar()}")
            two = conn.execute(text("select cast(:a as int) + cast(:b as int)"), {"a": 1, "b": 1}).scalar()
            print(f"1 + 1 = {two}")
        # Creates the table only when it is missing (the other examples make the same one).
        Base.metadata.create_all(engine)

        with Session(engine) as session:
            # A transaction that is rolled back leaves nothing behind.
            session.add(Note(body="never saved (sqlalchemy)"))
            session.flush()
            session.rollback()
            n = session.scalar(select(func.count()).select_from(Note).where(Note.body == "never saved (sqlalchemy)"))
            print(f"rolled back: {n} rows")

            note = Note(body="hello from SQLAlchemy")
            session.add(note)
            session.commit()
            total = session.scalar(select(func.count()).select_from(Note))
            print(f"notes: {total} in total, just added #{note.id}")
            for n in session.scalars(select(Note).order_by(Note.id.desc()).limit(3)):
                print(f"  #{n.id}: {n.body}")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
