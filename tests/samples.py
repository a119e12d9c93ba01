"""Where the tests' real-format samples live: tests/data, inside the repository, so that a clone with
nothing beside it runs the whole suite. tests/data/README.md says where each file comes from and how it
was cut. One constant, imported by every test that reads the samples."""
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
