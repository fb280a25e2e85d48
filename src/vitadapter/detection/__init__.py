"""Detector parts, one module per stage of the data flow (necks, RoI heads, post-processing)."""
