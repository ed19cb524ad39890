"""A training run as a structured value, and what makes two runs one experiment.

A :class:`RunSpec` is what ``metarl run CONFIG --set KEY=VALUE ...`` is made of: the config path and
its overrides, in the order given. Its :meth:`~RunSpec.command` is built from it, for display and to
reproduce the run. Its :meth:`~RunSpec.identity` is what the run computes: the config path, a hash of
the config it resolves to (the file with the overrides applied, without the keys of
:data:`WHERE_KEYS`, which change where or how often a run computes and saves but not what, and
without the seed) and the seed. A run trained on a GPU and the same run on CPUs, or checkpointed at
another interval, have one identity.

Results that stored only their command string are read with :meth:`RunSpec.parse`, once, where
they are loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from metarl.config import apply_overrides, load_toml

# "section.key" overrides that change where a run computes, or how often it logs and saves, but
# not what it computes: left out of a run's identity.
WHERE_KEYS = ("agent.device", "run.checkpoint_every", "run.log_every")
SEED_KEY = "run.seed"


@dataclass(frozen=True)
class Identity:
    """What one run computes: two runs with equal identities train the same model."""

    config: str
    config_hash: str  # of the resolved config, without WHERE_KEYS and the seed
    seed: int

    def experiment(self) -> tuple[str, str]:
        """The identity without the seed: the seeds of one experiment share it."""
        return self.config, self.config_hash


@dataclass(frozen=True)
class RunSpec:
    """``metarl run CONFIG --set KEY=VALUE ...`` as a value: the config path and its overrides as
    ``(section.key, value text)`` pairs, in command order (the order the command shows)."""

    config: str
    overrides: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, config: str, overrides: list[str]) -> RunSpec:
        """The run of ``config`` with ``--set`` overrides written ``section.key=value``."""
        pairs = []
        for text in overrides:
            key, sep, value = text.partition("=")
            if not sep:
                raise ValueError(f"an override is section.key=value, got {text!r}")
            pairs.append((key.strip(), value))
        return cls(config, tuple(pairs))

    @classmethod
    def parse(cls, command: str) -> RunSpec:
        """The run of a stored command string ``metarl run CONFIG --set K=V ...`` (as
        :meth:`command` writes it): the one place such strings are read."""
        words = command.split()
        if words[:2] != ["metarl", "run"] or len(words) < 3 or len(words) % 2 == 0:
            raise ValueError(f"not a `metarl run CONFIG --set KEY=VALUE ...` command: {command!r}")
        flags, texts = words[3::2], words[4::2]
        if any(flag != "--set" for flag in flags):
            raise ValueError(f"a command of a run holds only --set overrides: {command!r}")
        return cls.of(words[2], texts)

    def command(self) -> str:
        """The shell command that trains this run."""
        return f"metarl run {self.config} " + " ".join(f"--set {k}={v}" for k, v in self.overrides)

    def value(self, key: str) -> str | None:
        """The text the overrides give ``key`` (the last one wins, as in ``metarl run``), or None."""
        found = [v for k, v in self.overrides if k == key]
        return found[-1] if found else None

    def without(self, *keys: str) -> RunSpec:
        """This run with no override of ``keys``."""
        return replace(self, overrides=tuple((k, v) for k, v in self.overrides if k not in keys))

    def setting(self, key: str, value: str) -> RunSpec:
        """This run with each override of ``key`` set to ``value`` in place (appended if none)."""
        if self.value(key) is None:
            return replace(self, overrides=(*self.overrides, (key, value)))
        return replace(self, overrides=tuple((k, value if k == key else v) for k, v in self.overrides))

    @property
    def device(self) -> str:
        """The ``agent.device`` the run sets, ``cpu`` when it sets none."""
        return self.value("agent.device") or "cpu"

    @property
    def checkpoint_every(self) -> str | None:
        """The ``run.checkpoint_every`` the run sets, None when it keeps the config's."""
        return self.value("run.checkpoint_every")

    def identity(self) -> Identity:
        """What the run computes (see the module doc). Reads the config file."""
        resolved = apply_overrides(load_toml(self.config), [f"{k}={v}" for k, v in self.overrides])
        seed = int(resolved.get("run", {}).get("seed", 0))
        for dotted in (*WHERE_KEYS, SEED_KEY):
            section, key = dotted.split(".")
            if isinstance(resolved.get(section), dict):
                resolved[section].pop(key, None)
        text = json.dumps(resolved, sort_keys=True, default=str)
        return Identity(str(Path(self.config)), hashlib.sha256(text.encode()).hexdigest()[:16], seed)
