"""A PyTorch implementation of FedPM shaped like the authors' code, for parity and speed checks.

Needs the optional ``[bench]`` extra (``pip install torch==2.13.0``).
"""
