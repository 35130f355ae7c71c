"""Hand-written Alembic revisions; each file is a frozen snapshot of one schema step."""
