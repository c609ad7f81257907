"""``python -m svlab <command>``: see ``svlab/cli.py``."""
import sys

from svlab.cli import main

sys.exit(main(prog="python -m svlab"))
