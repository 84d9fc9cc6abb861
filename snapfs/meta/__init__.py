"""Metadata in SQLite: plumbing and migrations, the region index (its SQL), keys."""
