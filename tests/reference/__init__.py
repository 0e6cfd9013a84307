"""Harnesses that run the real reference programs (never copies of them) on the tiny fixtures."""
