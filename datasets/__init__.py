"""Dataset definitions: YFCC100M/YFCC15M parsing and cleaning, CC3M/CC12M inputs, eval catalog, demo corpus."""
