"""Plain functions, classes and constants that several test modules share (shared fixtures: tests/conftest.py)."""
