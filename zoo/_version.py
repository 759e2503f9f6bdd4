"""The package version (one place: zoo/__init__.py and the hub files read it from here)."""

__version__ = "0.1.0"
