"""Datasets: class names and palettes of the datasets the released models were trained on."""
