"""Two-stage prediction: detector and segmenter actor pools in one Ray Data pipeline."""
