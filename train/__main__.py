"""``python -m pkd.train`` (and ``torchrun -m pkd.train``) runs the pkd-train CLI."""

from pkd.train.cli import main

main()
