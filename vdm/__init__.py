"""vdm: a Variational Diffusion Model pipeline for Pokémon sprites.

Importing this package has no side effects; each module is one concept:

    errors     UserError: a problem the user can fix, reported without a traceback
    params     params.yaml loading and validation
    atomic     atomic file and directory writes
    archives   safe extraction of zip/tar archives
    synthetic  procedurally drawn sprite-like images (tests and smoke runs)
    sources    the data sources: kaggle, pokeapi, a local path, synthetic, auto
    images     decoding any sprite file into a 96x96 RGB uint8 array
    preprocess decode, dedupe, group, split and write the processed arrays
"""
