"""Parallelism: the device mesh and its logical-axis rules (sharding), pipeline
schedules, and multi-process runs (distributed)."""
