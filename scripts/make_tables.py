"""Regenerate every table (markdown + LaTeX) from results/ alone:  python scripts/make_tables.py [--only sw ma]"""
from outlierlab.reports import main

main("tables", __doc__)
