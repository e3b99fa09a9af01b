"""Installing on a connected machine: `medrwr-edge setup` (setup.py: models, encoders, default packs) and the
`medrwr-edge models` commands (cli.py). The model installer itself (registry, downloads, checks) is
medrwr_edge/assets.py."""
