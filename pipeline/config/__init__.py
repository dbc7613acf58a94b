"""Configuration: the schema (``schema``), Hydra composition of ``conf/`` with one-line errors
(``compose``) and ``target=auto`` detection (``hardware``). Checks live in ``pipeline.validate``."""
