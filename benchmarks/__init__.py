"""Benchmarks of `cpoly_kernels.cpoly_lora` against the anchors of OP_SPEC §5.

`python -m benchmarks.run --help` is the entry point; README.md beside this
file says what each module does.
"""
