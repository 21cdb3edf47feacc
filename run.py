r"""Runs the tasks a config lists (see caco_jax/main.py): the same as the `caco-jax` command.

python run.py --config configs/demo.py --workdir workdir/demo
"""

from caco_jax import main

if __name__ == "__main__":
    main.run()
