"""``python -m dmo.cli``: the same as the ``dmo`` command."""

from dmo.cli.main import main

main()
