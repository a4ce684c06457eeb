"""rayrec models layer."""
