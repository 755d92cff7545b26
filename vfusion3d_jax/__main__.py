"""`python -m vfusion3d_jax <command> ...` (see main.py)."""

from vfusion3d_jax.main import run

if __name__ == "__main__":
    run()
