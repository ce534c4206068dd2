"""Test-wide set-up: no test may reach the model hub, so any accidental download fails fast."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
