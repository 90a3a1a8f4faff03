"""The version of obafx (read by obafx/__init__.py and written into saved files by obafx/io.py)."""
__version__ = "0.1.0"
