"""``Step``: a training length written in epochs (``'30ep'``) or iterations (``'500it'``).

Schedules, milestones, rewind points and snapshot intervals are all Steps, converted to
iterations once the number of batches per epoch is known.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_RE = re.compile(r"^\s*(\d+)\s*(ep|it)\s*$")


@dataclass(frozen=True)
class Step:
    value: int
    unit: str  # "ep" or "it"

    @classmethod
    def parse(cls, text) -> "Step":
        if isinstance(text, Step):
            return text
        if isinstance(text, bool):
            raise ValueError(f"expected a step like '30ep' or '500it', got {text!r}")
        if isinstance(text, int):
            if text < 0:
                raise ValueError(f"a step must be >= 0, got {text}")
            return cls(text, "it")
        m = _RE.match(str(text))
        if not m:
            raise ValueError(f"expected a step like '30ep' or '500it', got {text!r}")
        return cls(int(m.group(1)), m.group(2))

    def iterations(self, batches_per_epoch: int) -> int:
        return self.value * batches_per_epoch if self.unit == "ep" else self.value

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"
