"""What more than one recipe needs: which outliers a study edits, the study's preflight checks, the calibration that
feeds its interventions. Recipes import from here; a recipe never imports another recipe."""
