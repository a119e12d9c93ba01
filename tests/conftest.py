"""Shared test setup: import the project from the repo root. Every data file a test reads is in
tests/data (tests/samples.py); the GPT-2 BPE files come from tiktoken's cache, offline when
TIKTOKEN_CACHE_DIR names a copy of it (.ci/run sets it), else from the network."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpserver import server  # noqa: E402,F401  the local HTTP server fixture, for every test file

__all__ = ["server"]
