"""Using a trained model: the Python API, the `vdm` command and the demo server."""
