"""Regenerate every table (markdown + LaTeX) from results/ alone:  python scripts/make_tables.py [--only sw ma]"""
import argparse
import sys
from pathlib import Path

from outlierlab.reports import run_builders

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--results", type=Path, default=Path("results"), help="results directory to read")
parser.add_argument("--out", type=Path, default=None, help="where to write (default: <results>/tables)")
parser.add_argument("--only", nargs="*", help="report names (default: all registered)")
args = parser.parse_args()
try:
    written = run_builders("tables", args.results, args.out or args.results / "tables", args.only)
except ValueError as error:
    sys.exit(f"error: {error}")
print("\n".join(map(str, written)) or "no tables: nothing in results/ to build from")
