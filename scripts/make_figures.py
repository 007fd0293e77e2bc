"""Regenerate every figure (PNG + PDF) from results/ alone:  python scripts/make_figures.py [--only sw ma]"""
from outlierlab.reports import main

main("figures", __doc__)
