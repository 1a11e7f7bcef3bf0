"""`python -m htcli ...` runs the `ht` command (handy under torchrun)."""

from htcli.cli import main

main()
