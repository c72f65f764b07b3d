"""vdm: a Variational Diffusion Model pipeline for Pokémon sprites.

Importing this package has no side effects. A subpackage per part of the pipeline (dvc.yaml's
stages), one job per module. Imports point only down: core, then data and model, then sampling,
then training and evaluation, then app (tests/test_layout.py checks it):

    core        what every part uses
        params      params.yaml loading and validation; SamplingOptions, the walk's settings
        registry    name -> function registries (samplers, loss weightings, sample metrics)
        errors      UserError: a problem the user can fix, reported without a traceback
        atomic      atomic file and directory writes, outputs committed together
        runtime     devices, determinism, processes
        progress    progress bars and log lines
        images      decoding any sprite file into a square RGB uint8 array; grids, PNG bytes
    data        the download and preprocess stages
        sources     the data sources: kaggle, pokeapi, a local path, synthetic, auto
        archives    safe extraction of zip/tar archives
        synthetic   procedurally drawn sprite-like images (tests and smoke runs)
        preprocess  decode, dedupe, group, split and write the processed arrays
        codecs      the lossless-codec yardstick for bits/dim
        splits      the processed splits, memory-mapped, in reproducible batches
    model       the model
        conversions levels <-> [-1, 1], alpha/sigma from gamma, eps <-> x
        schedules   gamma(t): fixed, learned linear, learned monotone network
        unet        the score network
        magnitude   the magnitude-preserving layers (model.magnitude_preserving)
        diffusion   the VDM, built from the model section: its denoiser and its loss in bits/dim
        colour      a sprite's colour class (its main hue bin, or grey), read from the image
        weightings  the loss weightings' registry
        decoder     the 256-level decoder term and its window of levels
        bound       bits/dim over a dataset; the post-training gamma_0 and eps-scale fits
        checkpoint  models/ and resumable checkpoints (weights only), checked loading
    training    the train stage
        loop        the training loop and its outputs
        step        one optimisation step, the learning-rate schedule
        optim       AdamW with update clipping
        branch      a held run's state finished by a run's decay
        ema         the EMA of the weights
        tracking    W&B and the CSV curves
        profiling   torch.profiler traces of the step and the sampler
    sampling    drawing sprites
        steps       the samplers' registry and their step functions
        samplers    the walk, colour classes and guidance, autoguidance, probability-flow encoding
        sprites     the sample stage's outputs
    evaluation  the evaluate stage
        metrics     the sample metrics' registry; FID/KID/IS, memorisation
        c2st        the classifier two-sample test
        evaluate    the stage: bits/dim, the metrics, eval.json
    app         using a trained model
        api         load, generate, interpolate from Python
        cli         the `vdm` command
        serve       the demo server
"""
