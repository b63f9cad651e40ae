"""File input and output: NIfTI volumes, RibFrac case discovery, atomic writes."""
