"""Alembic migrations for the allocator store (applied by `SqlStore.open`)."""
