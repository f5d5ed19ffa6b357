"""``python -m gpu_kquant``: the command line."""

from .cli import command

command()
