"""Reading dmo's YAML config files into strict pydantic models, with one-line errors that name the file, the key
and the problem (expert manifests: :mod:`dmo.manifest`; search spaces: :mod:`dmo.config`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dmo.errors import DmoError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_TYPE_MISMATCH = {"list_type", "dict_type", "model_type", "model_attributes_type"}
_BRANCH_TAG = re.compile(r"[\[\]]|^function-|^MixtureSource$")


def _format_error(source: str, exc: ValidationError) -> DmoError:
    errors = exc.errors()
    # A union reports one error per branch; the branch whose *type* did not match is noise.
    specific = [e for e in errors if e["type"] not in _TYPE_MISMATCH]
    err = (specific or errors)[0]
    loc = ".".join(str(p) for p in err["loc"] if not _BRANCH_TAG.search(str(p)))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return DmoError(f"{source}: {loc or 'top level'}: {msg}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DmoError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DmoError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise DmoError(f"{path}: expected a mapping of keys at the top level")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _format_error(source, exc) from None
    except DmoError as exc:
        raise DmoError(f"{source}: {exc}") from None
