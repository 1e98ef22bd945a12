"""HTTP serving over the generation engine."""
