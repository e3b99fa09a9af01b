"""Generated benchmark data (deterministic, with committed manifests in `medrwr_edge/data/`)."""
