"""Integrations of sodkern into training frameworks. Each submodule imports its framework only when used."""
