"""python -m vdm: the same as the `vdm` command."""

from vdm.cli import main

main()
