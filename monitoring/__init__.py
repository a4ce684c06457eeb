"""rayrec monitoring layer."""
