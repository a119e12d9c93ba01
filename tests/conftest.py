"""Shared test setup: import the project from the repo root, GPT-2 BPE offline from ../shared."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpserver import server  # noqa: E402,F401  the local HTTP server fixture, for every test file

__all__ = ["server"]
