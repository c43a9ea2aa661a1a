"""A run's data: its assets and shards prepared (prepare), the shards read into batches (loader), and
the curriculum's text-to-hybrid schedule (curriculum)."""
