"""Options more than one command takes, declared once each with one default (Typer's Annotated style).

A command's own options stay in its module; these read the same in every command's --help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

# --device not given (None): train and compare take the config's train.device (auto unless a config
# sets it), the other commands this one.
AUTO_DEVICE = "auto"

Device = Annotated[Optional[str], typer.Option(
    "--device", help="auto, cpu, cuda, cuda:N or mps (default: auto).", show_default=False)]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, only the result.")]
Overrides = Annotated[List[str], typer.Option(
    "--set", help="Override a config key, e.g. --set model.n_layer=4 (repeatable).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the config's train.seed).")]
TimeBudget = Annotated[Optional[float], typer.Option(
    "--time-budget", help="Stop after this many seconds of wall clock, with the learning-rate decay planned "
                          "to end then.")]
Threads = Annotated[int, typer.Option(
    "--threads", help="CPU threads per operation (default: chosen from the model's size and the CPUs other "
                      "programs leave free).")]
Dtype = Annotated[str, typer.Option(
    "--dtype", help="Inference precision: float32, bfloat16, or float16 (GPU only).")]
VocabSize = Annotated[Optional[int], typer.Option(
    "--vocab-size", help="Size a CONFIG's model for this many tokens instead of its text's characters, e.g. "
                         "50257 for GPT-2's own vocabulary.")]
Plot = Annotated[Optional[Path], typer.Option(
    "--plot", help="Also write the curves (inspect --attention: the attention maps) as an image (.png, .svg "
                   "or .pdf; needs matplotlib).")]

RunDir = Annotated[Optional[Path], typer.Argument(
    help="Run directory or checkpoint folder (default: newest under ./runs).", show_default=False)]
Target = Annotated[Optional[str], typer.Argument(
    help="Run directory, config path or shipped config name (default: newest run under ./runs, else config "
         "default).", show_default=False)]
