"""Lowest layer: errors, atomic file writes, device/dtype helpers. Imports nothing from argen."""
