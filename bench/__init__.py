"""``make bench``: cnnbatch's performance figures, each a ratio measured side by side in one run (docs/benchmarks.md)."""
