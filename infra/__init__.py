"""rayrec infra layer."""
