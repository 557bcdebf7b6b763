"""The `numbersvc` command line: `main.py` parses, `client.py` calls, `render.py` prints.

The console script is `numbersvc.cli.main:main`; `python -m numbersvc` runs the same.
"""
