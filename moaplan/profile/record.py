"""The profile record and its file: safetensors for the summaries, YAML beside it for the rest.

File layout for ``profiles/NAME.safetensors``:

- tensors, float64, summed (not averaged) over ``finished[N]`` samples, one set per length N:
  ``far/N [layers * kv_heads, nblk, 2]``, ``sink/N [layers * kv_heads, K, nblk, 2]`` and
  ``total/N [layers * kv_heads]`` (sum of |E| over all ``j < i`` entries); heads are layer-major;
- optionally the same per query head, whose group sums the KV heads' are (they price the
  prefill spans of query heads, :mod:`moaplan.query_spans`): ``query_far/N [layers *
  q_heads, nblk, 2]`` and ``query_sink/N [layers * q_heads, K, nblk, 2]``.  Gradient profiles
  have them; head scorers' profiles and files from before they existed do not.
- ``profiles/NAME.profile.yaml``: format, moaplan version, model shape and config fingerprint, block
  size, lengths, samples planned and finished per length, calibration data hash, the rule
  space it prices, the scorer that made it (``gradient``, the default of files written before
  the field existed, or a head scorer of :mod:`moaplan.profile.scorers`, whose raw per-KV-head
  scores are kept under ``head_scores``), and the sha256 of the tensor file (so a mismatched
  pair is detected).

An unfinished profile (a ``--resume`` checkpoint) is the same format with ``finished < samples``.

The metadata's name ends in ``.profile.yaml`` so that it can never be a plan's name (``moaplan
search --profile run.safetensors --out run.yaml`` once overwrote a profile's ``run.yaml``).
Files written before that, with the metadata in ``NAME.yaml``, are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import moaplan
from moaplan.errors import MoaplanError, ProfileError, one_line
from moaplan.io import (
    atomic_write,
    atomic_write_text,
    check_output,
    dump_yaml,
    file_head,
    load_yaml,
)
from moaplan.profile.cost import dropped_influence
from moaplan.rules import Rule, RuleSpace
from moaplan.shape import ModelShape

FORMAT = "moaplan-profile/1"
BLOCK = 64  # the summary's block size in tokens, unless told otherwise (profile, search, scorers)


def sink_blocks(rule_space: RuleSpace, block: int) -> int:
    """Rows of the sink table (``K``) a rule space needs; every sink must be whole blocks."""
    odd = [s for s in rule_space.sinks if s % block]
    if odd:
        raise ProfileError(f"sink {odd[0]} of the rule space is not a multiple of the block size "
                           f"{block}; choose sinks that are multiples of {block} or a smaller "
                           "--block")
    return max(rule_space.sinks) // block


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


@dataclass
class Profile:
    """Blockwise influence summaries of one model at several lengths (sums over samples)."""

    model: ModelShape
    block: int
    lengths: list[int]
    samples: dict[int, int]
    rule_space: RuleSpace = field(default_factory=RuleSpace)
    data_hash: str = ""
    finished: dict[int, int] = field(default_factory=dict)
    far_sum: dict[int, np.ndarray] = field(default_factory=dict)
    sink_sum: dict[int, np.ndarray] = field(default_factory=dict)
    # The same per query head, when every sample added so far was recorded per query head;
    # else empty (a head scorer's profile, an older file).
    query_far_sum: dict[int, np.ndarray] = field(default_factory=dict)
    query_sink_sum: dict[int, np.ndarray] = field(default_factory=dict)
    version: str = moaplan.__version__
    scorer: str = "gradient"  # what the summaries measure (see moaplan.profile.scorers)
    # The gradient scorer's differentiated quantity (moaplan.profile.profiler.OBJECTIVES);
    # files written before the field existed used the cross-entropy.
    objective: str = "cross_entropy"
    # A head scorer's raw scores, name -> [layers][kv_heads] (mean over lengths); gradient: {}.
    head_scores: dict[str, list[list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ProfileError(f"block size must be >= 1, got {self.block}")
        self.lengths = sorted(int(n) for n in self.lengths)
        if not self.lengths or self.lengths[0] < 2:
            raise ProfileError(f"a profile needs lengths >= 2, got {self.lengths}")
        heads = self.num_heads
        k = sink_blocks(self.rule_space, self.block)
        for n in self.lengths:
            nblk = num_blocks(n, self.block)
            self.finished.setdefault(n, 0)
            self.far_sum.setdefault(n, np.zeros((heads, nblk, 2)))
            self.sink_sum.setdefault(n, np.zeros((heads, k, nblk, 2)))
            if self.far_sum[n].shape != (heads, nblk, 2) or \
                    self.sink_sum[n].shape != (heads, k, nblk, 2):
                raise ProfileError(f"the summaries for length {n} have the wrong shape "
                                   f"{self.far_sum[n].shape}, {self.sink_sum[n].shape}")
        if not self.query_far_sum and not any(self.finished.values()):
            # a fresh profile: per query head until a sample comes without them
            q_heads = self.model.num_layers * self.model.num_attention_heads
            for n in self.lengths:
                self.query_far_sum[n] = np.zeros((q_heads,) + self.far_sum[n].shape[1:])
                self.query_sink_sum[n] = np.zeros((q_heads,) + self.sink_sum[n].shape[1:])
        if self.query_far_sum and (
                sorted(self.query_far_sum) != self.lengths or sorted(self.query_sink_sum)
                != self.lengths or any(self._query_mismatch(n) for n in self.lengths)):
            raise ProfileError("the per-query-head summaries do not match the KV heads' (a "
                               "KV head's are its query heads' sums); profile again")

    @property
    def num_heads(self) -> int:
        """KV heads of the whole model, layer-major (the optimizer's head index)."""
        return self.model.num_layers * self.model.num_key_value_heads

    @property
    def has_query_heads(self) -> bool:
        """Whether the profile prices query heads (:meth:`query_far`, :meth:`query_sink`)."""
        return bool(self.query_far_sum)

    def _query_mismatch(self, length: int) -> bool:
        """Whether the query heads' summaries at ``length`` fail to sum to the KV heads'."""
        pairs = ((self.query_far_sum[length], self.far_sum[length]),
                 (self.query_sink_sum[length], self.sink_sum[length]))
        heads = self.num_heads
        if pairs[0][0].shape[0] != pairs[1][0].shape[0]:
            return True
        return any(query.shape[1:] != kv.shape[1:] or query.shape[0] % heads
                   or not np.allclose(_group_sums(query, heads), kv, rtol=1e-6, atol=0)
                   for query, kv in pairs)

    @property
    def complete(self) -> bool:
        return all(self.finished[n] >= self.samples.get(n, 0) for n in self.lengths)

    def _length(self, length: int) -> int:
        if length not in self.far_sum:
            raise ProfileError(f"length {length} was not profiled; this profile has "
                               f"{', '.join(map(str, self.lengths))}")
        if not self.finished[length]:
            raise ProfileError(f"no sample of length {length} has been profiled yet")
        return self.finished[length]

    def far(self, length: int) -> np.ndarray:
        """Mean over samples of ``far``: ``[heads, nblk, 2]``."""
        count = self._length(length)
        return self.far_sum[length] / count

    def sink(self, length: int) -> np.ndarray:
        """Mean over samples of ``sink``: ``[heads, K, nblk, 2]``."""
        count = self._length(length)
        return self.sink_sum[length] / count

    def query_far(self, length: int) -> np.ndarray:
        """Mean over samples of ``far`` per query head: ``[layers * q_heads, nblk, 2]``."""
        return self._query(self.query_far_sum, length)

    def query_sink(self, length: int) -> np.ndarray:
        """Mean over samples of ``sink`` per query head: ``[layers * q_heads, K, nblk, 2]``."""
        return self._query(self.query_sink_sum, length)

    def check_query_heads(self, name: str = "this profile") -> None:
        """Raise :class:`ProfileError` unless the profile (called ``name`` in the message)
        prices query heads."""
        if not self.has_query_heads:
            raise ProfileError(f"{name} has no per-query-head summaries (a head scorer's, or "
                               "one written before moaplan recorded them); profile again with "
                               "the gradient scorer (delete it, or give another --profile "
                               "path) to choose query heads' spans")

    def _query(self, sums: dict[int, np.ndarray], length: int) -> np.ndarray:
        count = self._length(length)
        self.check_query_heads()
        return sums[length] / count

    def total(self, length: int) -> np.ndarray:
        """Mean total ``sum |E|`` per head: ``[heads]``."""
        return self.far(length).sum((1, 2))

    def dropped_influence(self, rules: Sequence[Rule], length: int) -> np.ndarray:
        """The optimizer's cost matrix ``(heads, len(rules))`` at a profiled length."""
        return dropped_influence(self.far(length), self.sink(length), rules, length, self.block)

    def dropped_share(self, rules: Rule | Sequence[Rule]) -> np.ndarray:
        """``(heads,)`` the influence each head drops as a share of all heads' total,
        averaged over the profiled lengths that have samples: how much a head loses,
        comparable across lengths whose raw influence differs by orders of magnitude.
        ``rules``: one rule for every head, or one rule per head (a plan's ``flat_rules``)."""
        if isinstance(rules, Rule):
            unique, column = [rules], np.zeros(self.num_heads, dtype=np.int64)
        else:
            unique = list(dict.fromkeys(rules))
            column = np.array([unique.index(r) for r in rules])
        heads = np.arange(self.num_heads)
        shares = [self.dropped_influence(unique, n)[heads, column]
                  / max(self.total(n).sum(), 1e-300)
                  for n in self.lengths if self.finished[n]]
        return np.mean(shares, axis=0)

    def duo_scores(self, sink: int, recent: int) -> np.ndarray:
        """``(layers, kv_heads)`` DuoAttention-style head scores for ``duo_plan``: the
        influence the streaming rule (``sink`` + ``recent`` keys) drops on each head at the
        longest profiled length."""
        dropped = self.dropped_influence([Rule.window(recent, sink=sink)], max(self.lengths))
        return dropped[:, 0].reshape(self.model.num_layers, self.model.num_key_value_heads)

    def add(self, length: int, far: np.ndarray, sink: np.ndarray, count: int = 1, *,
            per_query_head: bool = False) -> None:
        """Add the summed summaries of ``count`` samples of ``length``: per KV head, or with
        ``per_query_head`` per query head (``[layers * q_heads, ...]``, layer-major), whose
        group sums are the KV heads'.  A profile keeps its query heads' summaries only while
        every sample added has them."""
        if per_query_head:
            if self.has_query_heads:
                self.query_far_sum[length] = self.query_far_sum[length] + far
                self.query_sink_sum[length] = self.query_sink_sum[length] + sink
            far, sink = _group_sums(far, self.num_heads), _group_sums(sink, self.num_heads)
        else:
            self.query_far_sum.clear()
            self.query_sink_sum.clear()
        self.far_sum[length] = self.far_sum[length] + far
        self.sink_sum[length] = self.sink_sum[length] + sink
        self.finished[length] += count

    def check_shape(self, shape: ModelShape) -> None:
        """Raise :class:`ProfileError` unless this profile was made for the model ``shape`` (a
        shape, where :meth:`moaplan.plan.Plan.check_model` takes a config)."""
        if not self.model.same_shape(shape) or (
                self.model.fingerprint and shape.fingerprint
                and self.model.fingerprint != shape.fingerprint):
            raise ProfileError(f"the profile is for another model ({self.model.model_type or '?'}, "
                               f"{self.model.describe()}, fingerprint {self.model.fingerprint}); "
                               f"this one is {shape.describe()}, fingerprint {shape.fingerprint}")

    def metadata(self, tensor_sha256: str) -> dict[str, Any]:
        m = self.model
        return {
            "format": FORMAT,
            "moaplan_version": self.version,
            "model": {"model_type": m.model_type, "fingerprint": m.fingerprint,
                      "num_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
                      "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim},
            "block": self.block,
            "lengths": list(self.lengths),
            "samples": {n: self.samples.get(n, 0) for n in self.lengths},
            "finished": {n: self.finished[n] for n in self.lengths},
            "calibration_hash": self.data_hash,
            "rule_space": self.rule_space.to_dict(),
            "scorer": self.scorer,
            **({"objective": self.objective} if self.scorer == "gradient" else {}),
            "influence": ("sum over samples of |E_ij|, j < i, summed over each GQA group"
                          if self.scorer == "gradient" else
                          "sum over samples of each KV head's score spread uniformly over its "
                          "entries j < i (moaplan.profile.scorers)"),
            **({"head_scores": self.head_scores} if self.head_scores else {}),
            "tensors": {"sha256": tensor_sha256},
        }


def _group_sums(per_query_head: np.ndarray, kv_heads: int) -> np.ndarray:
    """Query heads' summaries ``[kv_heads * group, ...]`` (layer-major) summed over each GQA
    group: the KV heads'."""
    group = per_query_head.shape[0] // kv_heads
    return per_query_head.reshape(kv_heads, group, *per_query_head.shape[1:]).sum(1)


PROFILE_DIR = Path("profiles")


def default_profile_path(shape: ModelShape, scorer: str = "gradient") -> Path:
    """Where ``moaplan profile`` writes and ``moaplan search`` / ``baseline duo`` look for the
    profile of a model when no path is given: ``profiles/<model_type>-<fingerprint>.safetensors``
    (``-<scorer>`` added for a head scorer's profile).  Named by the config fingerprint, not
    the model's directory, so that any copy of one model finds its profile and two models that
    share a directory name never share one."""
    suffix = "" if scorer == "gradient" else f"-{scorer}"
    return PROFILE_DIR / f"{shape.model_type or 'model'}-{shape.fingerprint}{suffix}.safetensors"


def metadata_path(path: str | Path) -> Path:
    """The metadata file of the profile ``path``: ``NAME.profile.yaml`` (a name no plan has)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.profile.yaml")


def _legacy_metadata_path(path: Path) -> Path:
    return path.with_suffix(".yaml")


def is_metadata_file(path: Path) -> bool:
    """Whether ``path`` looks like a profile's metadata file."""
    head = file_head(path).decode("utf-8", errors="replace")
    return f"\nformat: {FORMAT}\n" in f"\n{head}"


def is_tensor_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_profile`."""
    head = file_head(path, 8)
    if len(head) < 8:
        return False
    size = struct.unpack("<Q", head)[0]
    if size > 2**20:
        return False
    try:
        header = json.loads(file_head(path, 8 + size)[8:])
        return header.get("__metadata__", {}).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def check_profile_output(path: str | os.PathLike) -> Path:
    """Fail before any work unless a profile (tensors and metadata) can be written at
    ``path`` without overwriting a file of another kind."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ProfileError(f"a profile file ends in .safetensors, got {path}")
    try:
        check_output(path, "profile", is_tensor_file)
        check_output(metadata_path(path), "profile metadata file", is_metadata_file)
    except MoaplanError as err:
        raise ProfileError(str(err)) from None
    return path


def _find_metadata(path: Path) -> Path:
    """The metadata file of ``path``, or the one an older moaplan wrote (``NAME.yaml``)."""
    meta = metadata_path(path)
    legacy = _legacy_metadata_path(path)
    if not meta.is_file() and legacy.is_file() and is_metadata_file(legacy):
        return legacy
    return meta


def _tensors(profile: Profile) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for n in profile.lengths:
        out[f"far/{n}"] = np.ascontiguousarray(profile.far_sum[n], dtype=np.float64)
        out[f"sink/{n}"] = np.ascontiguousarray(profile.sink_sum[n], dtype=np.float64)
        out[f"total/{n}"] = profile.far_sum[n].sum((1, 2))
        if profile.has_query_heads:
            out[f"query_far/{n}"] = np.ascontiguousarray(profile.query_far_sum[n],
                                                          dtype=np.float64)
            out[f"query_sink/{n}"] = np.ascontiguousarray(profile.query_sink_sum[n],
                                                           dtype=np.float64)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``path`` (safetensors) and its YAML beside it, each atomically, tensors first."""
    path = check_profile_output(path)
    tensors = _tensors(profile)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = profile.metadata(_sha256(path))
    atomic_write_text(metadata_path(path), dump_yaml(meta, sort_keys=False))
    return path


def load_profile(path: str | Path) -> Profile:
    """Read a profile; a missing, mismatched or malformed file pair raises :class:`ProfileError`."""
    path = Path(path)
    meta_file = _find_metadata(path)
    if not path.is_file() or not meta_file.is_file():
        raise ProfileError(f"profile {path} not found (it needs {path.name} and {meta_file.name})")
    meta = load_yaml(meta_file, "profile metadata file", ProfileError)
    try:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ProfileError(f"{meta_file} is not a {FORMAT} file")
        if meta["tensors"]["sha256"] != _sha256(path):
            raise ProfileError(f"{path.name} does not match {meta_file.name} (one of them was "
                               "changed or copied from another profile)")
        tensors = load_file(str(path))
        m = meta["model"]
        lengths = [int(n) for n in meta["lengths"]]
        shape = ModelShape(num_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
                           num_key_value_heads=m["num_key_value_heads"], head_dim=m["head_dim"],
                           model_type=m.get("model_type") or "", fingerprint=m.get("fingerprint"))
        _check_finite(path, tensors, lengths)
        profile = Profile(
            model=shape,
            block=int(meta["block"]), lengths=lengths,
            samples={int(n): int(c) for n, c in meta["samples"].items()},
            rule_space=RuleSpace.from_dict(meta["rule_space"]),
            data_hash=meta.get("calibration_hash", ""),
            finished={int(n): int(c) for n, c in meta["finished"].items()},
            far_sum={n: tensors[f"far/{n}"] for n in lengths},
            sink_sum={n: tensors[f"sink/{n}"] for n in lengths},
            query_far_sum={n: tensors[f"query_far/{n}"] for n in lengths
                           if f"query_far/{n}" in tensors},
            query_sink_sum={n: tensors[f"query_sink/{n}"] for n in lengths
                            if f"query_sink/{n}" in tensors},
            version=str(meta.get("moaplan_version", "")),
            scorer=str(meta.get("scorer", "gradient")),
            objective=str(meta.get("objective", "cross_entropy")),
            head_scores={str(k): [[float(x) for x in row] for row in v]
                         for k, v in (meta.get("head_scores") or {}).items()},
        )
        counts = [*profile.samples.values(), *profile.finished.values()]
        scores = [x for rows in profile.head_scores.values() for row in rows for x in row]
        if min(counts, default=0) < 0 or not np.isfinite(scores).all():
            raise ProfileError(f"profile {path} holds negative sample counts or NaN or "
                               "infinite head scores; profile again")
        return profile
    except ProfileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
            SafetensorError) as err:
        raise ProfileError(f"profile {path} is malformed ({type(err).__name__}: "
                           f"{one_line(err, 200)})") from None


def _check_finite(path: Path, tensors: dict[str, np.ndarray], lengths: list[int]) -> None:
    """Influence sums are finite and >= 0; anything else would turn into a plan (every head
    looks free, or NaN ranks first) instead of an error."""
    for n in lengths:
        for name in (f"far/{n}", f"sink/{n}", f"query_far/{n}", f"query_sink/{n}"):
            if name not in tensors and name.startswith("query"):
                continue  # optional
            values = tensors[name]
            if not np.isfinite(values).all() or (values < 0).any():
                raise ProfileError(f"profile {path} holds NaN, infinite or negative influence "
                                   f"({name}); profile again")
