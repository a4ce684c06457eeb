"""rayrec pipelines layer."""
