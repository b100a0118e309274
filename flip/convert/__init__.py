"""Converters between other projects' checkpoint layouts and this project's (one module each)."""
