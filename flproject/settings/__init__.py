"""Settings package: base.py is shared; local, test and production start from it."""
