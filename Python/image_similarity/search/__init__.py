"""Scoring a catalogue against a query: exact scans, 16-bit screened scans, HNSW graphs."""
