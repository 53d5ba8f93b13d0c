"""The one error type users see: a sentence that says what is wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable


class MergeguardError(Exception):
    """A problem with the user's input or environment, reported as one sentence (exit code 2).

    Raised inside a DataLoader worker, torch re-raises it in the main process with the worker's
    traceback as its text; `sentence` is then the original sentence again (its last line)."""

    @property
    def sentence(self) -> str:
        text = str(self)
        if "Original Traceback" in text:
            return text.strip().splitlines()[-1].split("MergeguardError: ", 1)[-1]
        return text


class SettingError(MergeguardError):
    """A setting out of its declared range: `field` names it, `template` says what is wrong with `{name}`
    where the setting's name goes (the library writes the field's name, the CLI its --flag)."""

    def __init__(self, field: str, template: str | None = None) -> None:
        if template is None:  # re-raised from a worker process with the whole text as its one argument
            template, field = field, ""
        self.field, self.template = field, template
        super().__init__(self.phrased(field))

    def phrased(self, name: str) -> str:
        return self.template.replace("{name}", name)


def reason(exc: BaseException, limit: int = 160) -> str:
    """A library exception's first sentence, for the end of one of ours (torch and open_clip append
    paragraphs of advice that is not the user's to follow)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch's weights-only refusal names what it refused on a later line: that line is the reason
    line = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    line = (line or type(exc).__name__).split(". ", 1)[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """" Did you mean 'ties'?" (the end of a sentence that lists the choices) for a mistyped choice, or "":
    the choice it spells in other case, else the longest choice it contains (`ties_merging`), else the
    shortest that contains it, else the closest spelling."""
    import difflib

    choices = list(choices)
    key = word.lower().replace("-", "_")
    exact = [c for c in choices if c.lower() == key]
    inside = sorted((c for c in choices if len(c) >= 3 and c.lower() in key), key=len, reverse=True)
    around = sorted((c for c in choices if len(key) >= 3 and key in c.lower()), key=len)
    found = exact or inside or around or difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" Did you mean {found[0]!r}?" if found else ""
