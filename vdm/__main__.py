"""python -m vdm: the same as the `vdm` command."""

from vdm.app.cli import main

main()
