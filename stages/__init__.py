"""Thin DVC stage entry points: read params, call `vdm`, write outputs. No maths here."""
