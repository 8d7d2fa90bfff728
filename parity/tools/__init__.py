"""Maintenance scripts (measurements behind documented numbers)."""
