"""Run the command line as `python -m numbersvc` (for example `python -m numbersvc serve`)."""

from numbersvc.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
