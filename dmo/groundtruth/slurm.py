"""A SLURM array script that trains a run folder's planned runs, one array task per run."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from dmo.atomic import atomic_file, write_text
from dmo.errors import DmoError
from dmo.groundtruth.runs import Run, RunFolder

# ------------------------------------------------------------------------------------------------ SLURM


def write_slurm(
    folder: RunFolder,
    runs: Sequence[Run],
    script: Path,
    lf_bin: Path,
    *,
    what: str,
    gpus: int = 1,
    cpus: int = 8,
    time_limit: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    sbatch: Sequence[str] = (),
) -> Path:
    """An array script with one task per run; each task runs ``dmo train run`` (train, move into place, register)."""
    if not runs:
        raise DmoError("no runs to put into a SLURM script")
    jobs = folder.root / "slurm" / f"{script.stem}.jobs"
    write_text(jobs, "".join(f"{r.name}\n" for r in runs))
    name = folder.plan().get("name") or folder.root.name
    directives = [
        f"--job-name=dmo-{name}-{what}",
        f"--array=0-{len(runs) - 1}",
        "--nodes=1",
        "--ntasks=1",
        f"--gres=gpu:{gpus}",
        f"--cpus-per-task={cpus}",
        f"--time={time_limit}",
        f"--output={folder.root / 'logs'}/slurm-%A_%a.out",
    ]
    directives += [f"--partition={partition}"] if partition else []
    directives += [f"--account={account}"] if account else []
    directives += [s if s.startswith("--") else f"--{s}" for s in sbatch]
    q = shlex.quote
    text = (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + f"""
# Written by 'dmo train {what}': one array task per run listed in the job file below. Each task trains its run with
# LLaMA-Factory, moves it into place and registers it in the expert manifest (safe to run concurrently). A task
# killed half-way resumes from its last checkpoint when resubmitted; finished runs are skipped.
#   submit:   sbatch {q(str(script))}
#   one run:  sbatch --array=K {q(str(script))}   (K = line number - 1 in the job file)
set -euo pipefail
RUN_FOLDER={q(str(folder.root))}
JOBS={q(str(jobs))}
DMO_PYTHON=${{DMO_PYTHON:-{q(sys.executable)}}}
LF_BIN=${{DMO_LF_BIN:-{q(str(Path(lf_bin).absolute()))}}}
RUN=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$JOBS")
if [ -z "$RUN" ]; then echo "no run at array index $SLURM_ARRAY_TASK_ID in $JOBS" >&2; exit 1; fi
mkdir -p "$RUN_FOLDER/logs"
exec "$DMO_PYTHON" -m dmo.cli train run "$RUN_FOLDER" --run "$RUN" --lf-bin "$LF_BIN"
"""
    )
    with atomic_file(script) as fh:
        fh.write(text)
    os.chmod(script, 0o755)
    return script


def default_slurm_script(what: str, name: str) -> Path:
    return Path("scripts") / "slurm" / f"train_{what}-{name}.sbatch"
