"""rayrec serving layer."""
