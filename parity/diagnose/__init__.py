"""Diagnoses: turn numeric differences and structural checks into findings with stable signatures."""
