"""Command-line entry points; the scripts in experiments/ call these (tests call them directly)."""
