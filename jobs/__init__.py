"""Thin entrypoints for ``ray job submit -- python -m jobs.<job> ...``; each takes the CLI's flags."""
