"""How many intra-op threads the engine's steps run on: all of torch's, or one fewer, whichever
decodes faster while it serves, measured on its own steps.

On a CPU the engine shares the cores with the HTTP front and, often, the clients. Two OpenMP
threads then wait on each other whenever one of them is descheduled: on 2 cores serving the
tiny model at c=64, a batch-64 decode step took 48 ms on 2 threads and 40 ms on 1 (its step
times logged under bench/threads.py's load; alone it takes 27 and 33), while SmolLM2 served
1.4-1.5x faster on 2 threads than on 1 (bench/threads.py). Which count wins depends on the
model, the machine and what else runs on it, and can change while it serves, so a start-up
timing cannot tell. The tuner tries both in short windows of decode steps and keeps the
faster (early, where the other count is clearly slower: SmolLM2 on one thread fewer here).
It tries again after a while, twice as long each time a trial keeps the choice (up to
MAX_HOLD_TOKENS); a changed choice starts from the first while again.

Only steps that decode alone are compared: their time per token is steady from step to step,
while a prefill's varies with its tokens. Windows and holds are counted in decoded tokens, so
a trial over a few tail sequences lasts as many tokens as one over a full batch. Pure Python
(no torch): the engine applies the count and reports each step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

WINDOW_TOKENS = 512  # decoded tokens per trial window (8 steps of a 64-sequence batch)
HOLD_TOKENS = 16384  # decoded tokens on the chosen count before trying both again ...
MAX_HOLD_TOKENS = 262144  # ... doubled by every trial that keeps the choice, up to this
# A trial ends after its second window when the other count was this much slower per token:
# a gap no drift within two windows explains, and trying it again would cost as much.
CLEAR_SLOWDOWN = 1.2

log = logging.getLogger("packserve.engine")


@dataclass(slots=True)
class ThreadTuner:
    """Chooses between `counts` (all threads, then one fewer) by the time per decoded token of
    decode-only steps. A trial runs four windows, chosen / other / other / chosen (so a drift
    in the batch weighs on both alike), or only the first two where the other count was
    CLEAR_SLOWDOWN slower; the faster count (the larger one on a tie) is then held for `hold`
    decoded tokens, doubled after each trial that kept it, up to `max_hold`."""

    counts: tuple[int, int]
    window: int = WINDOW_TOKENS
    hold: int = HOLD_TOKENS
    max_hold: int = MAX_HOLD_TOKENS
    choice: int = field(init=False)
    holding: int = field(init=False, default=0)  # the current hold's length in tokens
    trials: int = field(init=False, default=0)  # trials finished
    # the last trial's time per token on one thread fewer over on all (None before one ends)
    fewer_over_all: float | None = field(init=False, default=None)
    _plan: list[int] = field(init=False, default_factory=list)  # the trial's windows left
    _left: int = field(init=False, default=0)  # tokens left in this window or hold
    _sums: dict[int, list[float]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.counts)) != 2 or min(self.counts) < 1:
            raise ValueError(f"two distinct positive thread counts; got {self.counts}")
        if self.window < 1 or not 1 <= self.hold <= self.max_hold:
            raise ValueError("window and hold must be positive, hold at most max_hold")
        self.choice = self.counts[0]
        self._start_trial()

    @property
    def threads(self) -> int:
        """The count the next step runs on."""
        return self._plan[0] if self._plan else self.choice

    def observe(self, threads: int, seconds: float, decode_tokens: int) -> None:
        """A decode-only step that ran on `threads` for `seconds`, decoding `decode_tokens`.
        Steps run on another count than planned are ignored."""
        if threads != self.threads or decode_tokens < 1:
            return
        if self._plan:
            sums = self._sums[threads]
            sums[0] += seconds
            sums[1] += decode_tokens
        self._left -= decode_tokens
        if self._left > 0:
            return
        if not self._plan:
            self._start_trial()
            return
        self._plan.pop(0)
        if len(self._plan) == 2 and self._clearly_slower(self._plan[0]):
            self._plan.clear()
        if self._plan:
            self._left = self.window
            return
        self._decide()

    def _start_trial(self) -> None:
        other = self.counts[1] if self.choice == self.counts[0] else self.counts[0]
        self._plan = [self.choice, other, other, self.choice]
        self._left = self.window
        self._sums = {count: [0.0, 0] for count in self.counts}

    def _clearly_slower(self, count: int) -> bool:
        """`count` was CLEAR_SLOWDOWN slower per token than the choice, in the windows so far."""
        (other_s, other_n), (mine_s, mine_n) = self._sums[count], self._sums[self.choice]
        return other_s * mine_n > CLEAR_SLOWDOWN * mine_s * other_n

    def _decide(self) -> None:
        per_token = {count: s / n for count, (s, n) in self._sums.items()}
        all_threads, fewer = self.counts
        self.fewer_over_all = per_token[fewer] / per_token[all_threads]
        choice = min(self.counts, key=lambda count: (per_token[count], -count))
        kept = self.trials > 0 and choice == self.choice
        self.holding = min(2 * self.holding, self.max_hold) if kept else self.hold
        log.log(
            logging.DEBUG if choice == self.choice else logging.INFO,
            "threads: %d -> %d (a decoded token on %d threads takes %.2fx its time on %d); "
            "next trial in %d decoded tokens",
            self.choice,
            choice,
            fewer,
            self.fewer_over_all,
            all_threads,
            self.holding,
        )
        self.choice = choice
        self.trials += 1
        self._left = self.holding
