"""Experiment trackers, one module per backend; the public names live in :mod:`hasten.tracking`."""
