"""Offline tools that turn raw corpora into tokenized Arrow datasets (see docs/data.md)."""
