"""``python -m gpu_kquant``: the command line."""

from .cli import command

if __name__ == "__main__":  # a spawned device process imports this module as __mp_main__
    command()
