"""`python -m mergecli` (also what torchrun runs)."""

from mergecli.cli.app import main

if __name__ == "__main__":
    main()
