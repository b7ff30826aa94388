"""``python -m deeppose_cli``: the ``deeppose`` command (what ``torchrun -m`` starts)."""

from .cli import run

run()
