"""Makes the repository root importable in tests (benchmarks.plain_seed is shared with tests)."""
