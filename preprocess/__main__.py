"""`python -m pkd.preprocess` runs the pkd-prep CLI."""

from pkd.preprocess.cli import main

main()
