"""Integrations of sodkern into training frameworks (each behind its own extra)."""
