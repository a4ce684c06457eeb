"""rayrec features layer."""
