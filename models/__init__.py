"""Models trained on the substrate simulator."""
