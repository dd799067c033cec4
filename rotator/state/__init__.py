"""State stores behind `rotator.ports.StateStore`: SQLite (`rotator.state.sqlite`, the
embedded default) and PostgreSQL (`rotator.state.postgres`, for several daemons sharing
the work), with what both share in `rotator.state.shared`. This package re-exports the
SQLite store only: importing it never loads a PostgreSQL driver."""

from rotator.state.shared import MAX_DEAD_LETTERS, lease_owner
from rotator.state.sqlite import SCHEMA_VERSION, SqliteStateStore

__all__ = ["MAX_DEAD_LETTERS", "SCHEMA_VERSION", "SqliteStateStore", "lease_owner"]
