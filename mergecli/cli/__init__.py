"""The command line: flags in, Rich out. Only this package imports typer and rich."""
