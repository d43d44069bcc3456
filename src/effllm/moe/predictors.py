"""Expert predictors that work from routes alone (no hidden states).

The routing of one token is a walk over events ``(token, column)``, column = MoE layer in
order; the event after the last column is the next token's column 0. After the routes of an
event are known, ``observe`` is called; ``predict(target_column, n, ahead)`` then names the
experts most likely at the event ``ahead`` steps later (that event's column is
``target_column``). Predictors learn online: only from events already observed.

- ``FrequencyPredictor``: the most used experts of the target column so far.
- ``TransitionPredictor``: a first-order transition table between consecutive events (layer l to
  layer l+1, last layer to the next token's first); more steps ahead chain the table.
- ``TraceMatchPredictor``: MoE-Infinity's activation-matrix matching at iteration level: the
  current token's partial route (the columns seen so far) is matched against a bounded window of
  past tokens' full routes with MoE-Infinity's distance (one minus the mean over the observed
  layers of the cosine between row-normalised activation counts), and the closest past token's
  experts at the target column are predicted (its successor's, for the next token). Ties go to
  the most recent token. It uses a whole path of layers, not only the last one.
"""

from __future__ import annotations

import heapq

import torch


class Predictor:
    name = "predictor"

    def __init__(self, num_columns: int, num_experts: int):
        self.num_columns = num_columns
        self.num_experts = num_experts
        self.freq = [[0] * num_experts for _ in range(num_columns)]

    def observe(self, column: int, experts: list[int]) -> None:
        row = self.freq[column]
        for e in experts:
            row[e] += 1

    def predict(self, target_column: int, n: int, ahead: int = 1) -> list[int]:
        raise NotImplementedError

    def _top(self, scores: list, column: int, n: int) -> list[int]:
        """The n best experts by score; ties (and unseen experts) by frequency at ``column``, then
        lower id. Experts with neither score nor frequency are never named."""
        freq = self.freq[column]
        best = heapq.nlargest(n, range(self.num_experts), key=lambda e: (scores[e], freq[e], -e))
        return [e for e in best if scores[e] > 0 or freq[e] > 0]


class FrequencyPredictor(Predictor):
    name = "frequency"

    def predict(self, target_column: int, n: int, ahead: int = 1) -> list[int]:
        return self._top([0] * self.num_experts, target_column, n)


class TransitionPredictor(Predictor):
    name = "transition"

    def __init__(self, num_columns: int, num_experts: int):
        super().__init__(num_columns, num_experts)
        # table[c][a][b]: how often expert a at column c was followed by expert b at the next event
        self.table = [[[0] * num_experts for _ in range(num_experts)] for _ in range(num_columns)]
        self.previous: tuple[int, list[int]] | None = None

    def observe(self, column: int, experts: list[int]) -> None:
        super().observe(column, experts)
        if self.previous is not None:
            prev_col, prev = self.previous
            for a in prev:
                row = self.table[prev_col][a]
                for b in experts:
                    row[b] += 1
        self.previous = (column, list(experts))

    def predict(self, target_column: int, n: int, ahead: int = 1) -> list[int]:
        if self.previous is None:
            return FrequencyPredictor.predict(self, target_column, n)
        col, current = self.previous
        for _ in range(ahead):
            rows = [self.table[col][a] for a in current]
            scores = [sum(x) for x in zip(*rows)] if rows else [0] * self.num_experts
            col = (col + 1) % self.num_columns
            current = self._top(scores, col, n)
        return current


class TraceMatchPredictor(Predictor):
    name = "trace_match"

    def __init__(self, num_columns: int, num_experts: int, capacity: int = 1000):
        super().__init__(num_columns, num_experts)
        if capacity < 2:
            raise ValueError(f"TraceMatchPredictor: capacity must be >= 2 past tokens, got {capacity}")
        self.capacity = capacity
        # past tokens' activations, oldest first, laid out [columns, experts, token] so that one
        # column's experts are contiguous rows: 1/sqrt(k) where used (unit rows: a dot product is
        # the cosine). The buffer holds up to 2 * capacity tokens; the window is the last capacity.
        self.buffer = torch.zeros(num_columns, num_experts, 2 * capacity)
        self.stored = 0
        self.current = torch.zeros(num_columns, num_experts)
        self.seen = 0  # columns of the current token observed so far
        self.similarity = torch.zeros(0)  # sum over observed columns of the cosine to each past token
        # a tie-break smaller than any difference in similarity (a multiple of 1/k): later tokens win ties
        self.recency = torch.arange(capacity) * (0.25 / (capacity * num_columns * num_experts))

    @property
    def routes(self) -> torch.Tensor:
        return self.buffer[:, :, max(0, self.stored - self.capacity):self.stored]

    def observe(self, column: int, experts: list[int]) -> None:
        super().observe(column, experts)
        if column == 0 and self.seen:
            self._finish_token()
        distinct = list(dict.fromkeys(experts))
        value = len(distinct) ** -0.5
        self.current[column, distinct] = value
        self.seen = column + 1
        if self.stored:
            rows = self.routes[column].index_select(0, torch.tensor(distinct))
            self.similarity += rows.sum(0) * value

    def _finish_token(self) -> None:
        if self.stored == self.buffer.shape[2]:  # full: keep the newest capacity - 1 at the front
            keep = self.capacity - 1
            self.buffer[:, :, :keep] = self.buffer[:, :, self.stored - keep:self.stored].clone()
            self.stored = keep
        self.buffer[:, :, self.stored] = self.current
        self.stored += 1
        self.current.zero_()
        self.similarity = torch.zeros(self.routes.shape[2])
        self.seen = 0

    def predict(self, target_column: int, n: int, ahead: int = 1) -> list[int]:
        wraps = (self.seen - 1 + ahead) // self.num_columns  # how many tokens ahead the target lies
        candidates = min(self.stored, self.capacity) - wraps  # past tokens with a successor that far ahead
        if self.seen == 0 or candidates <= 0:
            return FrequencyPredictor.predict(self, target_column, n)
        routes = self.routes
        best = int(torch.argmax(self.similarity[:candidates] + self.recency[:candidates]))
        row = routes[target_column, :, best + wraps].tolist()
        return self._top(row, target_column, n)


PREDICTORS = ("frequency", "transition", "trace_match")


def make_predictor(name: str, num_columns: int, num_experts: int) -> Predictor:
    if name == "frequency":
        return FrequencyPredictor(num_columns, num_experts)
    if name == "transition":
        return TransitionPredictor(num_columns, num_experts)
    if name == "trace_match":
        return TraceMatchPredictor(num_columns, num_experts)
    raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {name!r}")
