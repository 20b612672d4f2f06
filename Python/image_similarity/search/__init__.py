"""Search: the catalogue as a table, the scoring methods, and searchers that find a query's best matches by one
method in one way (exact scan, 16-bit screened exact scan, HNSW graph, or in the database)."""
