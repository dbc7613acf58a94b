"""Will it work, will it fit: pure arithmetic and rules on the config, before any download."""
