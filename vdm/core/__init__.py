"""What every part of vdm uses: params.yaml's validation, errors for the user, atomic writes,
devices and processes, progress, image decoding and grids."""
