"""The configs `run.py` and `caco-jax` take by name (`--config demo`, `--config
pretrain:caco,r18,100k`) or by path. This folder is their one source: the installed package holds it
as `caco_jax.configs` (`caco_jax/configs` links here in a checkout)."""
