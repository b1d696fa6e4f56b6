"""`python -m mergecli`: the command line as a module, which is also what torchrun runs for
scale-out statistics (`torchrun ... -m mergecli regmean collect-stats`)."""

from mergecli.cli.app import main

if __name__ == "__main__":
    main()
