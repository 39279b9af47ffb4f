"""Helpers the test modules share (``tests`` is on pytest's ``pythonpath``)."""

import torch

from memit_lab import LoadedModel


class WeightSnapshot:
    """A copy of every weight of a model, to check that something left it exactly as it was.

    ``saved = WeightSnapshot(lm)``, later ``assert saved.unchanged()``.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.saved = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}

    def changed(self) -> set[str]:
        """Names of the tensors that differ (bit for bit) from the copy."""
        return {k for k, v in self.lm.model.state_dict().items() if not torch.equal(v, self.saved[k])}

    def unchanged(self) -> bool:
        return not self.changed()
