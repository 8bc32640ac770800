"""The schema of the host's state store, as forward-only migrations.

``MIGRATIONS[i]`` takes a database from ``PRAGMA user_version = i`` to ``i + 1``. The store applies each one
in its own ``BEGIN IMMEDIATE`` transaction, together with the ``user_version`` bump, so a migration is either
fully applied or not at all. Rules for whoever adds one:

- Append only. Never edit or reorder a migration that has shipped: databases in the field have run it.
- One tuple of statements per migration (no ``executescript``: it commits behind the transaction's back).
- Task columns mirror keys of the task document (see ``store.TASK_COLUMNS``); the document stays the
  source of truth, so a new model field needs a migration only when it must be indexed.
"""

from __future__ import annotations

#: Role names as stored in ``users.role``; ``auth.Role`` uses the same strings.
ROLE_NAMES = ("admin", "operator", "user", "viewer")

_V1 = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    f"""
    CREATE TABLE users (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of deleted users are never reused
        username   TEXT NOT NULL UNIQUE,
        role       TEXT NOT NULL CHECK (role IN ({", ".join(repr(r) for r in ROLE_NAMES)})),
        is_active  INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
        created_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE tokens (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name         TEXT NOT NULL,
        token_hash   TEXT NOT NULL UNIQUE,   -- hex SHA-256 of the token; the plaintext is never stored
        created_at   REAL NOT NULL,
        last_used_at REAL,
        revoked      INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
        revoked_at   REAL
    )
    """,
    "CREATE INDEX tokens_by_user ON tokens(user_id)",
    """
    CREATE TABLE nodes (
        hostname          TEXT PRIMARY KEY,
        url               TEXT NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ('online', 'offline')),
        registered_at     REAL NOT NULL,
        last_heartbeat    REAL,
        registration      TEXT NOT NULL DEFAULT '{}',  -- JSON: what the runner said when it registered
        metrics           TEXT NOT NULL DEFAULT '{}',  -- JSON: the latest heartbeat's measurements
        runner_token_hash TEXT
    ) WITHOUT ROWID
    """,
    # assigned_node deliberately has no foreign key: a task keeps the name of the node it ran on even if the
    # node is removed later. owner_id does: a user who owns tasks can be deactivated, not deleted.
    """
    CREATE TABLE tasks (
        task_id       INTEGER PRIMARY KEY,            -- 63-bit snowflake
        task_type     TEXT NOT NULL,
        owner_id      INTEGER REFERENCES users(id),
        status        TEXT NOT NULL,
        assigned_node TEXT,
        batch_id      INTEGER,
        submitted_at  REAL NOT NULL,
        queue_seq     INTEGER NOT NULL UNIQUE,        -- submission order, assigned by the store
        doc           TEXT NOT NULL                   -- JSON: the whole task record
    )
    """,
    "CREATE INDEX tasks_by_status ON tasks(status, queue_seq)",
    "CREATE INDEX tasks_by_owner ON tasks(owner_id, queue_seq)",
    "CREATE INDEX tasks_by_node ON tasks(assigned_node, status)",
    "CREATE INDEX tasks_by_batch ON tasks(batch_id) WHERE batch_id IS NOT NULL",
)

# The overlay network (``overlay_service``): runner ids and reserved addresses survive host restarts.
_V2 = (
    # One row per runner that has an overlay id. Keyed by the id (what the kernel's link names carry); the
    # hostname is unique, so a runner keeps its id across host restarts and underlay address changes. No
    # foreign key to nodes: removing a node releases its id explicitly, in the same transaction.
    """
    CREATE TABLE overlay_runners (
        runner_id    INTEGER PRIMARY KEY CHECK (runner_id > 0),
        hostname     TEXT NOT NULL UNIQUE,
        underlay     TEXT NOT NULL,                   -- the runner's VXLAN address (the host's remote)
        allocated_at REAL NOT NULL,
        updated_at   REAL NOT NULL
    )
    """,
    # Reserved overlay addresses. A row is live while unused and unexpired, or while the task using it has
    # not ended; dead rows are purged by the next reservation (see overlay_service). The token itself is
    # not stored: it is signed, and its nonce names the row.
    """
    CREATE TABLE overlay_reservations (
        nonce      TEXT PRIMARY KEY,
        ip         TEXT NOT NULL,
        node       TEXT NOT NULL,
        runner_id  INTEGER NOT NULL,
        owner_id   INTEGER REFERENCES users(id),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_by    INTEGER UNIQUE                     -- the task using the address, once one does
    ) WITHOUT ROWID
    """,
    "CREATE INDEX overlay_reservations_by_ip ON overlay_reservations(ip)",
)

#: Every migration, oldest first. ``len(MIGRATIONS)`` is the schema version this code writes.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2)

SCHEMA_VERSION = len(MIGRATIONS)
