"""The paper's 2-D Gaussian experiment (appendix): Neon on a tiny diffusion and a tiny autoregressive model.

    neon toy [--quick] [--out DIR] [--seed S]        (or python -m experiments.toy ...)

gaussian.py (data, closed-form FID) · diffusion.py · ar.py · train.py (Adam, self-training) ·
alignment.py (gradient cosine) · experiment.py (settings, the runs, the table) · plots.py · cli.py
"""
from experiments.toy.cli import add_toy_arguments, toy_main, write_outputs
from experiments.toy.experiment import FULL, QUICK, format_table, run_toy

__all__ = ["add_toy_arguments", "toy_main", "write_outputs", "run_toy", "format_table", "FULL", "QUICK"]
