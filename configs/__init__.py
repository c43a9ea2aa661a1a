"""The presets (*.yaml, every default in llara_default.yaml) and their typed schema (schema.py), at the
bottom of the layers: launch/ and bench/, trainer/ and shards/ all read their config from here."""
