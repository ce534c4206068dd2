"""Test-wide set-up: no test may reach the model hub, so any accidental download fails fast."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models gain nothing from threads, and busy-waiting thread pools crawl when the cores are shared: one
# thread keeps the suite fast and its timings steady (our graphs and diffusers run alike, so parity holds).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
