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
SCHEMA_VERSION = 7

#: SQLSTATEs :data:`APPEND_FUNCTION` raises: the master's epoch is stale;
#: the job is another master's (message: its owner); no such job; no such
#: slave in it; the chunk starts past the end (message: the stored length).
STALE_EPOCH, NOT_OWNER, NO_JOB, NO_SLAVE, GAP = "RM001", "RM002", "RM003", "RM004", "RM005"

#: ``remsh_append(job, slave, stream, offset, data, master, epoch, max_output,
#: chunk_cost, session, count)``: what
#: :meth:`remsh.store.postgres.PostgresJobStore.append_output` does, fenced
#: by the master's epoch, as one statement; returns the stream's length.
#: The job's row lock orders its chunks' sequence numbers.
APPEND_FUNCTION = """
CREATE FUNCTION remsh_append(p_job TEXT, p_name TEXT, p_stream TEXT, p_offset BIGINT, p_data BYTEA,
                             p_master TEXT, p_epoch BIGINT, p_max BIGINT, p_cost BIGINT,
                             p_session TEXT, p_count BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch BIGINT; v_owner TEXT; v_pos BIGINT; v_kept BIGINT; v_fresh BYTEA; v_keep BYTEA; v_seq BIGINT;
BEGIN
    SELECT epoch INTO v_epoch FROM remsh_masters WHERE name = p_master FOR SHARE;
    IF v_epoch IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION USING ERRCODE = 'RM001', MESSAGE = coalesce(v_epoch::text, 'gone');
    END IF;
    SELECT owner INTO v_owner FROM remsh_jobs WHERE id = p_job FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'RM003', MESSAGE = 'no job';
    END IF;
    IF v_owner <> p_master THEN
        RAISE EXCEPTION USING ERRCODE = 'RM002', MESSAGE = v_owner;
    END IF;
    SELECT CASE WHEN p_stream = 'stdout' THEN stdout_bytes ELSE stderr_bytes END, kept_bytes INTO v_pos, v_kept
        FROM remsh_job_slaves WHERE job_id = p_job AND name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'RM004', MESSAGE = 'no slave';
    END IF;
    IF p_session IS NOT NULL THEN
        UPDATE remsh_sessions SET received = p_count WHERE id = p_session AND job_id = p_job;
    END IF;
    IF p_offset > v_pos THEN
        RAISE EXCEPTION USING ERRCODE = 'RM005', MESSAGE = v_pos::text;
    END IF;
    v_fresh := substring(p_data FROM (v_pos - p_offset + 1)::int);
    IF length(v_fresh) = 0 THEN
        RETURN v_pos;
    END IF;
    v_keep := substring(v_fresh FROM 1 FOR greatest(0, least(p_max - v_kept - p_cost, length(v_fresh)))::int);
    IF length(v_keep) > 0 THEN
        SELECT coalesce(max(seq), -1) + 1 INTO v_seq FROM remsh_output WHERE job_id = p_job;
        INSERT INTO remsh_output (job_id, seq, name, stream, pos, data)
            VALUES (p_job, v_seq, p_name, p_stream, v_pos, v_keep);
    END IF;
    UPDATE remsh_job_slaves SET
        stdout_bytes = CASE WHEN p_stream = 'stdout' THEN v_pos + length(v_fresh) ELSE stdout_bytes END,
        stderr_bytes = CASE WHEN p_stream = 'stderr' THEN v_pos + length(v_fresh) ELSE stderr_bytes END,
        kept_bytes = v_kept + CASE WHEN length(v_keep) > 0 THEN length(v_keep) + p_cost ELSE 0 END,
        truncated = truncated OR length(v_keep) < length(v_fresh)
        WHERE job_id = p_job AND name = p_name;
    PERFORM nextval('remsh_changes');
    PERFORM pg_notify('remsh_store', p_job);
    RETURN v_pos + length(v_fresh);
END
$$
"""

#: The owner check of :data:`APPEND_FUNCTION` ...
_OWNER_CHECK = "IF v_owner <> p_master THEN"
#: ... and of version 6: a master that claimed a slave's part of another
#: master's job (``remsh_dispatch``, :mod:`remsh.store.pgdispatch`) writes
#: that slave's output, while its claim runs and under the epoch it claimed with.
_CLAIM_CHECK = ("IF v_owner <> p_master AND NOT EXISTS (SELECT 1 FROM remsh_dispatch WHERE job_id = p_job "
                "AND slave = p_name AND state = 'running' AND claimed_by = p_master AND claim_epoch = p_epoch) THEN")
assert APPEND_FUNCTION.count(_OWNER_CHECK) == 1
#: ``remsh_append`` as of version 6.
APPEND_FUNCTION_6 = APPEND_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION").replace(
    _OWNER_CHECK, _CLAIM_CHECK)

#: The session update of :data:`APPEND_FUNCTION` ...
_SESSION_UPDATE = "UPDATE remsh_sessions SET received = p_count WHERE id = p_session AND job_id = p_job;"
#: ... and of version 7: only a session of the appending master's own.  A
#: master writing under a claim (version 6) appends to another master's job,
#: and must not move the count of that job's other sessions.
_OWN_SESSION_UPDATE = _SESSION_UPDATE.replace("AND job_id = p_job;", "AND job_id = p_job AND owner = p_master;")
assert APPEND_FUNCTION.count(_SESSION_UPDATE) == 1
#: ``remsh_append`` as of version 7.
APPEND_FUNCTION_7 = APPEND_FUNCTION_6.replace(_SESSION_UPDATE, _OWN_SESSION_UPDATE)

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
    # appending output in one statement (one round trip instead of eight)
    2: (APPEND_FUNCTION,),
    # a cancel asked of any master, carried to the one that runs the job
    3: ("ALTER TABLE remsh_jobs ADD COLUMN cancel_reason TEXT",),
    # the registry of slaves: each master's slaves as its ``remsh ls`` row
    # (JSON), so that any master lists the whole cluster (remsh.slaveregistry)
    4: ("""CREATE TABLE remsh_slaves (
               master TEXT NOT NULL,
               name TEXT NOT NULL,
               row TEXT NOT NULL,
               updated DOUBLE PRECISION NOT NULL,
               PRIMARY KEY (master, name)
           )""",),
    # work crossing masters (remsh.crossmaster): a slave's part of a job
    # asked of the master holding that slave, and the bytes a put or a get
    # carries between the two masters
    5: ("""CREATE TABLE remsh_dispatch (
               id BIGSERIAL PRIMARY KEY,
               job_id TEXT COLLATE "C" NOT NULL REFERENCES remsh_jobs (id) ON DELETE CASCADE,
               slave TEXT NOT NULL,
               origin TEXT NOT NULL,
               holder TEXT NOT NULL,
               kind TEXT NOT NULL,
               spec TEXT NOT NULL,
               state TEXT NOT NULL,
               claimed_by TEXT,
               claim_epoch BIGINT,
               cancel_reason TEXT,
               result TEXT,
               created DOUBLE PRECISION NOT NULL,
               UNIQUE (job_id, slave)
           )""",
        "CREATE INDEX remsh_dispatch_open ON remsh_dispatch (slave) WHERE state IN ('pending', 'running')",
        """CREATE TABLE remsh_blobs (
               job_id TEXT COLLATE "C" NOT NULL REFERENCES remsh_jobs (id) ON DELETE CASCADE,
               name TEXT NOT NULL,
               seq INTEGER NOT NULL,
               data BYTEA NOT NULL,
               PRIMARY KEY (job_id, name, seq)
           )""",
        APPEND_FUNCTION_6),
    # a claimer's append counts only its own session (not another master's of the same job)
    6: (APPEND_FUNCTION_7,),
}


__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "APPEND_FUNCTION", "APPEND_FUNCTION_6", "APPEND_FUNCTION_7",
           "STALE_EPOCH", "NOT_OWNER",
           "NO_JOB", "NO_SLAVE", "GAP"]
