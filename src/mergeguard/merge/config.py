"""The merge YAML file: the same names as the `merge` flags, plus `base` and `inputs`.

```yaml
method: ties
base: openai/clip-vit-base-patch32      # or a local file / folder
inputs:
  - finetuned/cars                      # weight 1
  - {path: finetuned/dtd, weight: 0.5}
add: [finetuned/pets]                   # weight +1 (as --add); the analogy's and learning's side
subtract: [finetuned/toxic]             # weight -1 (as --subtract): forgetting
lam: 0.3
density: 0.2
normalize: mean                         # or sum
trim_scope: tensor                      # or vector
seed: 0
dtype: auto
shard_size: 5GB
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeguard.errors import MergeguardError
from mergeguard.merge.registry import all_params
from mergeguard.yamlfile import read_yaml

ENGINE_KEYS = {"method", "base", "inputs", "reference", "seed", "dtype", "shard_size", "out",
               "allow_missing", "allow_pickle", "weight", "overwrite", "add", "subtract"}


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a merge YAML file into flag-named settings; `inputs` becomes paths plus `weight`."""
    path = Path(path)
    raw = read_yaml(path, "the config")
    if not isinstance(raw, dict):
        raise MergeguardError(f"the config {path} must be a mapping of settings.")
    settings = {str(k).replace("-", "_"): v for k, v in raw.items()}
    known = ENGINE_KEYS | set(all_params())
    for key in settings:
        if key not in known:
            raise MergeguardError(
                f"unknown setting {key!r} in {path}; known: {', '.join(sorted(known))}."
            )
    for key, kinds, what in (("method", (str,), "a method name"), ("seed", (int,), "an integer"),
                             ("shard_size", (str, int), "a size such as 5GB"), ("dtype", (str,), "a dtype name"),
                             ("base", (str,), "a path or Hub id"), ("reference", (str,), "a path or Hub id")):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise MergeguardError(f"'{key}' in {path} must be {what}, got {value!r}.")
    if "weight" in settings and not (
        isinstance(settings["weight"], list)
        and all(isinstance(w, int | float) and not isinstance(w, bool) for w in settings["weight"])
    ):
        raise MergeguardError(f"'weight' in {path} must be a list of numbers, one per input.")
    inputs = settings.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, list):
            raise MergeguardError(f"'inputs' in {path} must be a list of paths or {{path, weight}}.")
        paths, weights = [], []
        for item in inputs:
            if isinstance(item, dict) and "path" in item:
                weight = item.get("weight", 1.0)
                if isinstance(weight, bool) or not isinstance(weight, int | float):
                    raise MergeguardError(f"the weight of input {item['path']} in {path} must be a number.")
                paths.append(str(item["path"]))
                weights.append(float(weight))
            elif isinstance(item, str):
                paths.append(item)
                weights.append(1.0)
            else:
                raise MergeguardError(f"each input in {path} must be a path or {{path, weight}}, got {item!r}.")
        settings["inputs"] = paths
        if "weight" not in settings:
            settings["weight"] = weights
    for key in ("add", "subtract"):
        value = settings.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise MergeguardError(f"'{key}' in {path} must be a list of paths.")
    return settings


def signed_inputs(inputs: list[str] | None, weights: list[float] | None, add: list[str] | None,
                  subtract: list[str] | None) -> tuple[list[str], list[float]]:
    """Task arithmetic's three operations as one weighted list: `inputs` with their `weights` (1 each by
    default), then every `add` at +1 (learning, an analogy's plus side) and every `subtract` at −1
    (forgetting: θ0 − λτ; an analogy's minus side)."""
    inputs, add, subtract = list(inputs or []), list(add or []), list(subtract or [])
    weights = [float(w) for w in weights] if weights else [1.0] * len(inputs)
    if len(weights) != len(inputs):
        raise MergeguardError(f"--weight was given {len(weights)} times for {len(inputs)} inputs (--add and "
                              "--subtract take +1 and -1 and need none).")
    return inputs + add + subtract, weights + [1.0] * len(add) + [-1.0] * len(subtract)
