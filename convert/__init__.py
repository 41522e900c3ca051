"""stream-convert as a library: recipes, the packed layout, GPTQ and calibration, repack."""
