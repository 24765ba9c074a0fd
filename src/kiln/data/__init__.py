"""Data sources: one module per source."""
