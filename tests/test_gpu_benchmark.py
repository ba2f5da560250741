"""benchmarks/gpu.py, the one command a GPU session runs (issue 17), must run end to end before a GPU is lent:
its --quick form runs every row but the compiled ones on the CPU with tiny sizes."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.fit
def test_quick_benchmark_prints_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    threads = torch.get_num_threads()
    try:
        table = benchmark.main(["--quick", "--threads", "1", "--out", str(tmp_path / "gpu.md")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "gpu.md").read_text() == table
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    rows = {row[0]: row[1] for row in cells[1:]}
    number = re.compile(r"^[\d,]+(\.\d+)?( s|x)?$")
    for name, value in rows.items():
        if "compiled" in name:
            continue
        # a timing too noisy to read on a loaded CPU is reported as such; any other failure fails the test
        assert number.match(value) or value == "failed" and "too noisy" in table, (name, value)
    for expected in ("MLE images/s per epoch, eager, default Adam", "PLE/MLE epoch time, fused Adam",
                     "PLE images/s per epoch, bf16", "digits lineages/hour, one at a time",
                     "digits lineages/hour, S = 2 batched", "default study, PLE generation on cpu"):
        assert any(name.startswith(expected) for name in rows), expected
    assert rows["compiled variants"] == "not run"
