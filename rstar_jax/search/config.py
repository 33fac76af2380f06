"""SearchConfig: every setting of one search stage (defaults: the reference's data-generation settings)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

MODES = ("terminal", "ppm", "inference")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    # terminal: terminal-guided annotation (rounds 1-2); ppm: PPM-augmented (rounds 3-4);
    # inference: PPM-guided search whose answers are scored by the PPM, not graded.
    mode: str = "terminal"
    rollouts: int = 8
    max_rollouts_unsolved: int = 0  # rollouts for a problem with no correct answer yet (0 = `rollouts`)
    num_candidates: int = 8  # n: steps sampled per expansion
    max_depth: int = 16
    max_step_tokens: int = 2048
    max_context_tokens: int = 4096  # a leaf whose prompt reaches this is not expanded
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    c: float = 2.0  # UCT exploration constant
    unvisited: str = "zero"  # UCT of an unvisited child: "zero" (reference) or "inf" (paper)
    propagate_failures: bool = False  # back up a failed step's -1 along its path (paper) or not (reference)
    answer_first: bool = True  # reference: when a candidate is an answer, it is the only child kept
    dedupe: bool = True  # drop candidates whose text repeats an earlier one
    runs: int = 1  # independent searches per problem, seeds seed .. seed + runs - 1 (inference trajectories)
    seed: int = 0
    exec_timeout_s: float = 30.0
    batch_size: int = 16  # trees searched in lock-step (does not change results)
    capacity: int = 0  # nodes per tree (0 = enough for every rollout to reach max_depth)
    # Text the policy sees before every prompt: the bootstrap round's instruction and worked examples (RSTAR.md
    # section 2). Tree records, the PPM and the training data hold the plain prompt.
    prompt_prefix: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.unvisited not in ("zero", "inf"):
            raise ValueError(f"unvisited must be 'zero' or 'inf', got {self.unvisited!r}")
        for name in ("rollouts", "num_candidates", "max_depth", "max_step_tokens", "max_context_tokens", "runs",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_rollouts_unsolved", "top_k", "capacity", "c", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.exec_timeout_s > 0:
            raise ValueError(f"exec_timeout_s must be positive, got {self.exec_timeout_s}")
        if self.max_rollouts_unsolved and self.max_rollouts_unsolved < self.rollouts:
            raise ValueError(f"max_rollouts_unsolved ({self.max_rollouts_unsolved}) must be 0 or >= rollouts "
                             f"({self.rollouts})")
        if self.runs > 1 and self.mode != "inference":
            raise ValueError(f"runs={self.runs}: independent searches per problem are inference trajectories; data "
                             f"generation (mode {self.mode!r}) extracts one tree per problem (use more rollouts)")
        if self.capacity and self.capacity < 1 + self.num_candidates:
            raise ValueError(f"capacity {self.capacity} cannot hold the root and one expansion")

    @property
    def uses_ppm(self) -> bool:
        return self.mode != "terminal"

    @property
    def rollout_cap(self) -> int:
        return max(self.rollouts, self.max_rollouts_unsolved)

    @property
    def tree_capacity(self) -> int:
        # Each rollout expands at most one new node per level, each into at most n children.
        return self.capacity or 1 + self.rollout_cap * (self.max_depth + 1) * self.num_candidates

    def tree_settings(self) -> dict:
        """The settings that shape the trees (batch_size does not), for resume checks."""
        fields = dataclasses.asdict(self)
        fields.pop("batch_size")
        if not self.prompt_prefix:
            fields.pop("prompt_prefix")  # the searches written before the prefix existed stay resumable
        return fields

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.tree_settings(), sort_keys=True).encode()).hexdigest()[:16]
