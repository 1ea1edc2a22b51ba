"""Write lmms-eval task files for the tiny-world benchmarks, one task per domain plus a group.

The output folder is meant for ``--include_path`` (or ``TaskManager(include_path=...)``). Every path in it is
relative (to the folder itself), so the task folder and the data folder can be moved together, e.g. into a
container or another machine, without rewriting anything.

Task names start with ``dmo_tiny_`` because lmms-eval lets its ~2,000 built-in task names win over included
ones: a generic name such as ``ocr`` could silently run a different benchmark.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from dmo.atomic import atomic_dir
from dmo.errors import DmoError
from dmo.mixture import check_domain_name

TASK_PREFIX = "dmo_tiny_"
GROUP_NAME = "dmo_tiny"
METRIC = "exact_match"
#: Tiny-world answers are a word or a number; a few tokens are enough and keep CPU evaluation fast.
MAX_NEW_TOKENS = 8


def task_name(domain: str) -> str:
    return f"{TASK_PREFIX}{check_domain_name(domain)}"


def write_tiny_tasks(
    data_root: Path, out_dir: Path, domains: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS
) -> Path:
    """Write ``dmo_tiny_<domain>.yaml`` per domain, ``dmo_tiny.yaml`` (the group) and ``utils.py`` into ``out_dir``.

    ``data_root/<domain>/test.jsonl`` must exist for every domain. ``out_dir`` belongs to dmo: it is replaced
    as a whole, atomically, so a concurrent evaluation never sees half-written task files. Pass the tiny world's
    own ``max_new_tokens`` so that lmms-eval generates exactly what the world's ground truth was measured with.
    Returns ``out_dir``.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    domains = list(domains)
    if not domains:
        raise DmoError("no domains given: pass at least one domain to write tiny-world tasks for")
    for domain in domains:
        check_domain_name(domain)
        jsonl = data_root / domain / "test.jsonl"
        if not jsonl.is_file():
            raise DmoError(f"missing test data {jsonl}: build the tiny-world data for domain {domain!r} first")
    if len(set(domains)) != len(domains):
        raise DmoError(f"domain listed twice in {domains}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DmoError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")

    # Paths are relative to the task folder; lmms-eval resolves ``data_files`` against the YAML's folder and
    # utils.py resolves image paths against its own location.
    rel_root = Path(os.path.relpath(data_root.resolve(), out_dir.resolve()))
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for domain in domains:
            text = _task_yaml(domain, (rel_root / domain).as_posix(), max_new_tokens)
            (tmp / f"{task_name(domain)}.yaml").write_text(text)
        (tmp / f"{GROUP_NAME}.yaml").write_text(_group_yaml(domains))
        (tmp / "utils.py").write_text(_utils_py(domains, rel_root.as_posix()))
    return out_dir


def _q(text: str) -> str:
    """A YAML scalar: JSON strings are valid YAML and escape everything that needs it."""
    return json.dumps(text)


def _task_yaml(domain: str, rel_domain_dir: str, max_new_tokens: int) -> str:
    # No stop strings: answers end at the model's end-of-turn token, exactly as in dmo.tinyworld.generate.
    return f"""\
# Written by dmo.scoring.tasks; regenerate rather than edit.
task: {task_name(domain)}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {_q(rel_domain_dir + "/test.jsonl")}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual_{domain}
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  num_beams: 1
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: {METRIC}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _group_yaml(domains: Sequence[str]) -> str:
    tasks = "\n".join(f"  - {task_name(d)}" for d in domains)
    return f"""\
# Written by dmo.scoring.tasks; regenerate rather than edit.
group: {GROUP_NAME}
task:
{tasks}
aggregate_metric_list:
  - metric: {METRIC}
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""


def _utils_py(domains: Sequence[str], rel_root: str) -> str:
    # One doc_to_visual per domain because lmms-eval passes doc_to_visual only the document, and the image path
    # in a document is relative to its own domain folder.
    visual_fns = "\n\n".join(f"def doc_to_visual_{d}(doc):\n    return _visual({_q(d)}, doc)\n" for d in domains)
    return f'''\
"""lmms-eval hooks for the dmo tiny-world tasks. Written by dmo.scoring.tasks; regenerate rather than edit."""

from pathlib import Path

from dmo.tinyworld.data import read_image
from dmo.tinyworld.generate import exact_match

# The data root, relative to this file, so that the task folder and the data can move together.
DATA_ROOT = (Path(__file__).resolve().parent / {_q(rel_root)}).resolve()


def _visual(domain, doc):
    return [read_image(DATA_ROOT / domain / doc["image"])]


{visual_fns}

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {{}}
    return f"{{kwargs.get('pre_prompt', '')}}{{doc['question']}}{{kwargs.get('post_prompt', '')}}"


def process_results(doc, results):
    return {{{_q(METRIC)}: float(exact_match(results[0], doc["answer"]))}}
'''
