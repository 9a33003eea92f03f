"""StylEx."""
