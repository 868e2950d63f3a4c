"""Sequence parallelism: ParallelConfig, explicit groups, Ulysses, ring, hybrid, coordinator."""
