"""Config files (`get_config(arg)` -> ml_collections.ConfigDict) and their shared pieces."""
