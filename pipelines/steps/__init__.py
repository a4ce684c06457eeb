"""The steps of rayrec's pipelines, one module each."""
