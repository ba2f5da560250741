#!/usr/bin/env bash
# Run here, before benchmarks/gpu.py goes to a lent GPU machine: it downloads into .whl/ (git-ignored) the wheels
# of the few packages benchmarks/gpu.py imports that the GPU machines' image lacks (it has Python 3.12, PyTorch,
# numpy, pandas, pyarrow, scikit-learn, scipy, safetensors, PyYAML, pillow, tqdm; no Prefect, which the benchmark
# does without). Versions as pinned in requirements.lock. The device command then installs them from .whl/
# (docs/performance.md, "The GPU benchmark: what a GPU session runs").
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 torch_fidelity==0.4.0
ls .whl
