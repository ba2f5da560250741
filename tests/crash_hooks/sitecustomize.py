"""Kill and pause points for tests/test_crash.py, loaded into a child ``madloop run`` through PYTHONPATH (Python
imports ``sitecustomize`` at start-up). Nothing here is part of madloop; without MADLOOP_TEST_HOOK it does nothing.

MADLOOP_TEST_HOOK is JSON: ``{"point": ..., "match": ..., "nth": 1, "action": "kill" | "pause", "marker": path,
"go": path}``. At the nth call of the point whose target contains ``match``, the hook appends a line to ``marker``
and then SIGKILLs its own process (exactly there: no race with a test polling from outside) or waits until the file
``go`` exists. Points:

- ``replace``: ``os.replace(src, dst)``, between an atomic write's temporary file and its rename (dst matched);
- ``dvc_dump``: DVC's ``Stage.dump``, inside ``dvc add``: the files are hashed and in the cache, the .dvc file
  (matched) is not written;
- ``artifact``: MLflow's local artifact upload of a file (its path matched), inside the MLflow logging of a
  generation: the nested run exists, its params are logged, this artifact is not.
"""

import json
import os
import signal
import time

SPEC = json.loads(os.environ.get("MADLOOP_TEST_HOOK") or "null")
_seen = 0


def _hit(what: str) -> None:
    global _seen
    _seen += 1
    if _seen < SPEC.get("nth", 1):
        return
    with open(SPEC["marker"], "a") as f:
        f.write(f"{what}\n")
    if SPEC.get("action", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + 600
    while not os.path.exists(SPEC["go"]) and time.time() < deadline:
        time.sleep(0.05)


def _install() -> None:
    point, match = SPEC["point"], SPEC["match"]
    if point == "replace":
        original = os.replace

        def replace(src, dst, *args, **kwargs):
            if match in os.fspath(dst):
                _hit(f"replace {os.fspath(dst)}")
            return original(src, dst, *args, **kwargs)

        os.replace = replace
    elif point == "dvc_dump":
        from dvc.stage import Stage

        original_dump = Stage.dump

        def dump(self, *args, **kwargs):
            if match in str(self.path):
                _hit(f"dvc dump {self.path}")
            return original_dump(self, *args, **kwargs)

        Stage.dump = dump
    elif point == "artifact":
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        original_log = LocalArtifactRepository.log_artifact

        def log_artifact(self, local_file, *args, **kwargs):
            if match in os.fspath(local_file):
                _hit(f"artifact {local_file}")
            return original_log(self, local_file, *args, **kwargs)

        LocalArtifactRepository.log_artifact = log_artifact
    else:
        raise ValueError(f"MADLOOP_TEST_HOOK: unknown point {point!r}")


if SPEC:
    _install()
