"""`python -m decal` runs the CLI."""

from .cli import main

main()
