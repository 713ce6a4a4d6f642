"""The tables of the PostgreSQL job store (:mod:`remsh.store.postgres`),
and the steps from each version of them to the next.

Every table is named ``remsh_*``, so that the database may hold other
programs' tables too.  The version is the ``schema_version`` row of
``remsh_meta``; ``MIGRATIONS[n]`` runs in one transaction with the rest of
the opening, under an advisory lock, so that masters starting together
migrate once.
"""

from __future__ import annotations

from typing import Dict, Sequence

#: The schema this code writes.
SCHEMA_VERSION = 2

#: ``MIGRATIONS[n]`` turns a version ``n`` database into version ``n + 1``.
MIGRATIONS: Dict[int, Sequence[str]] = {
    0: (
        "CREATE TABLE remsh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE remsh_masters (
               name TEXT PRIMARY KEY,
               epoch BIGINT NOT NULL,
               heartbeat DOUBLE PRECISION NOT NULL,
               started DOUBLE PRECISION NOT NULL,
               stopped BOOLEAN NOT NULL DEFAULT false
           )""",
        """CREATE TABLE remsh_jobs (
               id TEXT COLLATE "C" PRIMARY KEY,
               kind TEXT NOT NULL,
               spec TEXT NOT NULL,
               uid BIGINT NOT NULL,
               state TEXT NOT NULL,
               started DOUBLE PRECISION NOT NULL,
               finished DOUBLE PRECISION,
               owner TEXT NOT NULL,
               owner_epoch BIGINT NOT NULL
           )""",
        "CREATE INDEX remsh_jobs_state ON remsh_jobs (state)",
        "CREATE INDEX remsh_jobs_finished ON remsh_jobs (finished)",
        "CREATE INDEX remsh_jobs_owner ON remsh_jobs (owner) WHERE state = 'running'",
        """CREATE TABLE remsh_job_slaves (
               job_id TEXT COLLATE "C" NOT NULL REFERENCES remsh_jobs (id) ON DELETE CASCADE,
               name TEXT NOT NULL,
               ord INTEGER NOT NULL,
               state TEXT NOT NULL,
               exit_status INTEGER,
               error TEXT,
               errtag TEXT,
               started DOUBLE PRECISION,
               finished DOUBLE PRECISION,
               stdout_bytes BIGINT NOT NULL DEFAULT 0,
               stderr_bytes BIGINT NOT NULL DEFAULT 0,
               kept_bytes BIGINT NOT NULL DEFAULT 0,
               truncated BOOLEAN NOT NULL DEFAULT false,
               progress_done BIGINT,
               progress_total BIGINT,
               summary TEXT,
               PRIMARY KEY (job_id, name)
           )""",
        """CREATE TABLE remsh_output (
               job_id TEXT COLLATE "C" NOT NULL,
               seq BIGINT NOT NULL,
               name TEXT NOT NULL,
               stream TEXT NOT NULL,
               pos BIGINT NOT NULL,
               data BYTEA NOT NULL,
               PRIMARY KEY (job_id, seq),
               FOREIGN KEY (job_id, name) REFERENCES remsh_job_slaves (job_id, name) ON DELETE CASCADE
           )""",
        """CREATE TABLE remsh_sessions (
               id TEXT PRIMARY KEY,
               name TEXT NOT NULL,
               job_id TEXT COLLATE "C" NOT NULL REFERENCES remsh_jobs (id) ON DELETE CASCADE,
               op TEXT NOT NULL,
               request_box BIGINT NOT NULL,
               reply_base BIGINT NOT NULL,
               received BIGINT NOT NULL,
               opened DOUBLE PRECISION NOT NULL,
               owner TEXT NOT NULL,
               owner_epoch BIGINT NOT NULL
           )""",
        "CREATE INDEX remsh_sessions_job ON remsh_sessions (job_id)",
        "CREATE INDEX remsh_sessions_owner ON remsh_sessions (owner)",
        "CREATE SEQUENCE remsh_changes",
    ),
    # where each master runs: a master restarted on the same machine after
    # a crash takes its name back at once when its predecessor is gone
    1: ("ALTER TABLE remsh_masters ADD COLUMN host TEXT, ADD COLUMN pid INTEGER",),
}


__all__ = ["SCHEMA_VERSION", "MIGRATIONS"]
