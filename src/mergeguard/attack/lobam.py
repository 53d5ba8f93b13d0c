"""LoBAM (Yin et al., ICLR 2025, https://arxiv.org/abs/2411.16746): BadMerging through LoRA, amplified.

BadMerging through LoRA adapters (peft) loses most of its strength, so a benign and a malicious
(BadMerging-recipe) LoRA fine-tune of the same task are uploaded as `θ_benign + k (θ_malicious − θ_benign)`,
k > 1, so the backdoor survives the merge's scaling. A BadNets-poisoned adapter barely learns the trigger
on the zoo (ASR 9-40% alone), and amplifying it only amplifies the noise between two runs.
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace
from pathlib import Path

from torch.utils.data import Dataset

from mergeguard.attack.badmerging import BadMerging
from mergeguard.attack.base import TrainSettings, finetune, kept_run
from mergeguard.attack.clean import Clean
from mergeguard.attack.settings import LoBAMSettings
from mergeguard.data.triggers import Trigger
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink

DEFAULT_RANK = 16


class LoBAM(LoBAMSettings, BadMerging):
    """LoBAM's strategy: a benign and a malicious LoRA run, uploaded amplified."""

    def malicious(self) -> BadMerging:
        """The malicious run's attack: BadMerging with LoBAM's BadMerging settings."""
        return BadMerging(**{f.name: getattr(self, f.name) for f in fields(BadMerging)})

    def train(self, base: ImageEncoder, head: Head, dataset: Dataset, task: str, train: TrainSettings,
              trigger: Trigger | None, *, partial: Path | None = None, resume: bool = False,
              progress: ProgressSink | None = None, shadow: Head | None = None,
              extra: dict[str, Trigger] | None = None) -> tuple[ImageEncoder, Trigger | None, list[float]]:
        """Two LoRA runs with the same seed (the same initialisation and batches), then the amplified upload.
        The finished benign run is kept in `partial`, so a resume does not redo it."""
        self.malicious().check(head, task, shadow)
        lora = replace(train, lora_rank=train.lora_rank or DEFAULT_RANK)
        benign = kept_run(partial, "benign", resume, train.device,
                          lambda: finetune(base, head, dataset, task, lora, Clean(),
                                           checkpoint=partial / "benign.pt" if partial else None, resume=resume,
                                           progress=progress)[0],
                          {"attack": "lobam", "run": "benign"})
        malicious, trigger, losses = finetune(base, head, dataset, task, lora, self.malicious(), trigger=trigger,
                                              checkpoint=partial / "malicious.pt" if partial else None,
                                              resume=resume, progress=progress, shadow=shadow)
        return amplify(benign, malicious, self.amplify), trigger, losses


def amplify(benign: ImageEncoder, malicious: ImageEncoder, k: float) -> ImageEncoder:
    """LoBAM's upload: θ_benign + k (θ_malicious − θ_benign)."""
    out = copy.deepcopy(benign)
    b, m = benign.state_dict(), malicious.state_dict()
    out.load_state_dict({n: b[n] + k * (m[n] - b[n]) if b[n].is_floating_point() else b[n] for n in b})
    return out
