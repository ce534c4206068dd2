"""Helpers for tests and benchmarks: tiny random-weight models and tokenizer files."""
