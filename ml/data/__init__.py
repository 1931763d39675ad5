"""Data: decode and check landed images, run the Great Expectations suites, ingest a day, the catalog."""
