"""What the benchmarks share: a merge kept on disk, an evaluation kept on disk, and `--set FIELD=VALUE` on a
settings dataclass. Imported by the scripts beside it (`python bench/NAME.py` puts this folder on the path).
"""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any


def merged(base: Path, out: Path, inputs: list[Path], method: str, params: dict[str, Any]) -> Path:
    """The merge of `inputs` onto `base` into `out` (`mergeguard merge`'s engine), unless an earlier run left it."""
    from mergeguard.checkpoint.resolve import open_checkpoint
    from mergeguard.merge.engine import merge_checkpoints

    if not (out / "model.safetensors").exists() and not any(out.glob("*.safetensors")):
        merge_checkpoints(open_checkpoint(str(base)), [open_checkpoint(str(p)) for p in inputs], method, params,
                          out=out)
    return out


KEPT = ("ca_avg", "asr_t", "asr_t_no_trigger", "asr_n", "asr_n_no_trigger")


def measured(cache: Path | None, model: Any, heads: dict, test: dict, trigger: Any, target_task: str | None,
             keep: tuple[str, ...] | None = KEPT) -> dict[str, Any]:
    """`eval`'s numbers (those in `keep`; None: its whole result) of `model` (an encoder or its folder), read
    from `cache` (a JSON file) when an earlier run wrote it there."""
    from mergeguard.eval import evaluate
    from mergeguard.models.encoder import load_encoder

    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    encoder = load_encoder(str(model)) if isinstance(model, str | Path) else model
    r = evaluate(encoder, heads, test, trigger=trigger, target_task=target_task, device="cpu")
    kept = r if keep is None else {k: r.get(k) for k in keep}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(kept))
    return kept


def parse_set(settings: Any, item: str) -> tuple[str, Any]:
    """`FIELD=VALUE` (a field of the `settings` dataclass, nested ones as `attack.interpolation`) as (field,
    value of the field's type); an unknown field or a bad value ends the script with one sentence."""
    field, _, value = item.partition("=")
    obj = settings
    for name in field.split("."):
        if not is_dataclass(obj) or name not in {f.name for f in fields(obj)} or not value:
            raise SystemExit(f"--set {item!r}: name a field of {type(settings).__name__} and a value (FIELD=VALUE, "
                             f"nested ones as attack.bd_weight); the fields: {', '.join(vars(settings))}.")
        obj = getattr(obj, name)
    kind = type(obj) if obj is not None else float  # an unset optional number (LFPM's lr) takes a float
    try:
        return field, (value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    except ValueError:
        raise SystemExit(f"--set {item!r}: {field} takes a {kind.__name__}.") from None


def with_value(obj: Any, path: list[str], value: Any) -> Any:
    """`obj` with the (nested) field at `path` set to `value`."""
    if len(path) == 1:
        return replace(obj, **{path[0]: value})
    return replace(obj, **{path[0]: with_value(getattr(obj, path[0]), path[1:], value)})


def with_sets(settings: Any, items: list[str]) -> Any:
    """`settings` with every `--set FIELD=VALUE` applied."""
    for item in items:
        field, value = parse_set(settings, item)
        settings = with_value(settings, field.split("."), value)
    return settings
