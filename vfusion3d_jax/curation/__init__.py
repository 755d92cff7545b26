"""Curation of synthetic orbits: label-free consistency scores, learned quality, elevation, filtering."""
