"""The ensembler's engine: exact top-k fitness on per-model top-K candidates, and the genetic algorithm.

Used by `trainer/ensemble.py` (the public API and the CLI); kept apart so that each file reads on its own.

Reduced form (`Reduced`). The fused score of class c for image i is S_c = sum_m w_m x_m[c] with w >= 0
(x: a model's scores in the chosen space). For the fitness the label y is in the top-k iff fewer than
k other classes have S_c >= S_y (a tie counts against the label, so that no weighting can gain from
ties). Per image we keep only the candidates U = (union over models of each model's top-K classes) +
{y}, each model's values on U, and tau_m = the largest value of model m outside its own top-K. Any
class outside U then has S_c <= sum_m w_m tau_m =: B, for every weight vector. Counting the candidates
that reach S_y exactly:

1. if the label beats every model's tau (x_m[y] > tau_m for all m: it is in every model's top-K,
   clear of the rest), every class outside U scores below it for all weights (the image is "closed");
2. else if S_y > B (with a 1e-5 relative margin, so that rounding never decides), no class outside U
   can reach the label: exact;
3. else if k or more candidates reach the label: a miss whatever lies outside U: exact;
4. otherwise the image is "open" for these weights. It is read once from the score files and closed
   for good: its candidates become every class that reaches the label in at least one model (one
   that no model scores as high as the label scores below it for all w >= 0, not all zero).

So every fitness value is the exact count, not an approximation. The sums are float32, accumulated
model by model in the order given (a compiled kernel here, numpy in `trainer.ensemble.weighted_sum`),
each product and sum rounded once, so both give bit-identical fused scores and ties come out the same.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

TOPK = (5, 1)  # fitness: class-averaged top-5, ties broken by class-averaged top-1
MARGIN = 1e-5  # relative margin of case 2 above
_IMAGES = 32  # images per kernel task: the population's partial sums of their candidates stay in cache


@numba.njit(parallel=True, cache=True)
def _reach(w, values, starts, lengths, label_pos, count, label_score):  # pragma: no cover - compiled
    """Per individual p and image i: the label's fused score and the number of other candidates that
    reach it. Sums run over models in order, one rounding per product and per sum (no fast-math, so
    no fused multiply-add): bit-identical to numpy's `acc += w_m * x_m`. Each task takes a few images
    and the whole population, so every value is read from memory once per generation."""
    n = starts.shape[0]
    n_pop, n_models = w.shape
    for t in numba.prange((n + _IMAGES - 1) // _IMAGES):
        i0, i1 = t * _IMAGES, min(n, (t + 1) * _IMAGES)
        j0, j1 = starts[i0], starts[i1 - 1] + lengths[i1 - 1]
        s = np.zeros((n_pop, j1 - j0), np.float32)
        for m in range(n_models):
            v = values[m, j0:j1]
            for p in range(n_pop):
                wm = w[p, m]
                sp = s[p]
                for j in range(j1 - j0):
                    sp[j] += wm * v[j]
        for p in range(n_pop):
            for i in range(i0, i1):
                y = s[p, label_pos[i] - j0]
                c = 0
                for j in range(starts[i] - j0, starts[i] + lengths[i] - j0):
                    if s[p, j] >= y:
                        c += 1
                count[p, i] = c - 1  # not the label itself
                label_score[p, i] = y


@numba.njit(parallel=True, cache=True)
def _kth_largest(x, k, out):  # pragma: no cover - compiled
    """out[m, i] = the k-th largest value of x[m, i, :] (counting repeats): one pass per row through a
    sorted buffer of the k largest so far, much cheaper than a partition when k << C."""
    n_models, n, c = x.shape
    for t in numba.prange(n_models * n):
        m, i = t // n, t % n
        buf = np.full(k, -np.inf, np.float32)  # ascending; buf[0] is the k-th largest so far
        for j in range(c):
            v = x[m, i, j]
            if v > buf[0]:
                q = 1
                while q < k and buf[q] < v:
                    buf[q - 1] = buf[q]
                    q += 1
                buf[q - 1] = v
        out[m, i] = buf[0]


def class_mean(hits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-averaged accuracy of each row of `hits` (P x N bool): `metrics.class_averaged`, vectorised
    with bincount so that a whole population is scored in one call."""
    hits = np.atleast_2d(hits)
    p = hits.shape[0]
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    idx = (labels[None, :] + num_classes * np.arange(p)[:, None]).ravel()
    per = np.bincount(idx, weights=hits.ravel(), minlength=p * num_classes).reshape(p, num_classes)
    return (per[:, present] / counts[present]).mean(axis=1)


@dataclass
class Block:
    """Candidates of a group of images, flattened: `values` is models x candidates."""

    images: np.ndarray  # index of each image in the fitted half
    values: np.ndarray  # (M, L) float32
    starts: np.ndarray  # first candidate of each image
    lengths: np.ndarray  # candidates per image
    label_pos: np.ndarray  # position of each image's label among the flattened candidates
    bound: np.ndarray | None  # (M, n) tau per model and image; None: every image is closed
    closed: np.ndarray  # (n,) bool: exact for all weights (case 1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.values, self.starts, self.lengths, self.label_pos, self.closed)) + (
            0 if self.bound is None else self.bound.nbytes)

    def counts(self, w: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
        """Other candidates reaching the label per individual and image, and which of those counts may
        be short (cases 1-3 do not hold): both P x n."""
        count = np.empty((len(w), len(self.starts)), np.int32)
        sy = np.empty(count.shape, np.float32)
        if len(self.starts):
            _reach(w, self.values, self.starts, self.lengths, self.label_pos, count, sy)
        if self.bound is None:
            return count, np.zeros(count.shape, bool)
        b = w @ self.bound
        sure = sy - b > MARGIN * np.maximum(np.abs(sy), np.abs(b))
        return count, ~(self.closed | sure | (count >= kmax))


def _block(images: np.ndarray, x: np.ndarray, labels: np.ndarray, cand: np.ndarray, lengths: np.ndarray,
           bound: np.ndarray | None, closed: np.ndarray) -> Block:
    """A block from candidates `cand` (flattened, ascending per image, label included)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    row = np.repeat(np.arange(len(images)), lengths)
    values = np.ascontiguousarray(x[:, row, cand])
    label_pos = np.flatnonzero(cand == labels[row])
    return Block(images, values, starts, lengths, label_pos, bound, closed)


def candidate_block(images: np.ndarray, x: np.ndarray, labels: np.ndarray, k: int) -> Block:
    """Reduced form of images whose scores are `x` (M x n x C, in the fitting space): tau_m = model m's
    (k+1)-th largest value; candidates = the classes some model scores above its tau (its top-k, fewer
    where values tie at tau) plus the label."""
    m, n, c = x.shape
    ar = np.arange(n)
    if k >= c:
        cand = np.tile(np.arange(c), n)
        return _block(images, x, labels, cand, np.full(n, c), None, np.ones(n, bool))
    bound = np.empty((m, n), np.float32)
    _kth_largest(np.ascontiguousarray(x, np.float32), k + 1, bound)
    mask = np.zeros((n, c), bool)
    for j in range(m):
        mask |= x[j] > bound[j][:, None]
    mask[ar, labels] = True
    closed = (x[:, ar, labels] > bound).all(axis=0)
    return _block(images, x, labels, np.nonzero(mask)[1], mask.sum(axis=1), bound, closed)


def closure_block(images: np.ndarray, x: np.ndarray, labels: np.ndarray) -> Block:
    """Case 4: every class that reaches the label in at least one model (plus the label); exact for all
    weights >= 0 because a class that every model scores below the label scores below it in any sum."""
    ar = np.arange(x.shape[1])
    beats = (x >= x[:, ar, labels][:, :, None]).any(axis=0)
    beats[ar, labels] = True
    return _block(images, x, labels, np.nonzero(beats)[1], beats.sum(axis=1), None, np.ones(len(images), bool))


@dataclass
class Reduced:
    """Exact fitness (class-averaged top-5, then top-1) of weighted sums over one set of images.

    `read(rows)` returns the models' scores of those rows (M x r x C float32, in the fitting space);
    it is called once per chunk here and again only for the images that case 4 closes.
    """

    read: Callable[[np.ndarray], np.ndarray]
    rows: np.ndarray  # dataset rows of the fitted images, ascending
    labels: np.ndarray
    num_classes: int
    k: int = 10
    chunk_rows: int = 4096
    closure_budget: int = 4 << 30  # bytes of closed images kept; beyond it they are re-read on each use
    blocks: list[Block] = field(default_factory=list)
    closures: list[Block] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        t0 = time.perf_counter()
        self.resolved = np.zeros(len(self.rows), bool)
        for lo in range(0, len(self.rows), self.chunk_rows):
            images = np.arange(lo, min(lo + self.chunk_rows, len(self.rows)))
            x = self.read(self.rows[images])
            self.blocks.append(candidate_block(images, x, self.labels[images], self.k))
            del x  # before the next read: one chunk in memory at a time
        lengths = np.concatenate([b.lengths for b in self.blocks]) if self.blocks else np.zeros(1)
        self.stats = {"images": len(self.rows), "k": self.k, "candidates_mean": float(lengths.mean()),
                      "candidates_max": int(lengths.max()),
                      "closed_initially": int(sum(b.closed.sum() for b in self.blocks)),
                      "bytes": sum(b.nbytes for b in self.blocks), "build_seconds": time.perf_counter() - t0,
                      "reopened": 0, "closure_bytes": 0, "dense_rereads": 0}

    def counts(self, w: np.ndarray) -> np.ndarray:
        """Number of other classes reaching the label's fused score, per individual (rows of `w`) and
        image; exact up to max(TOPK) (a count of 5 may stand for more, which decides nothing)."""
        w = np.ascontiguousarray(np.atleast_2d(w), np.float32)
        kmax = max(TOPK)
        out = np.empty((len(w), len(self.rows)), np.int32)
        unsure = np.zeros(len(self.rows), bool)
        for b in self.blocks:
            count, open_ = b.counts(w, kmax)
            out[:, b.images] = count
            unsure[b.images] |= open_.any(axis=0)
        for b in self.closures:
            out[:, b.images] = b.counts(w, kmax)[0]
        todo = np.flatnonzero(unsure & ~self.resolved)
        for lo in range(0, len(todo), max(1, self.chunk_rows // 4)):
            images = todo[lo:lo + max(1, self.chunk_rows // 4)]
            b = closure_block(images, self.read(self.rows[images]), self.labels[images])
            out[:, images] = b.counts(w, kmax)[0]
            self.stats["reopened"] += len(images)
            if self.stats["closure_bytes"] + b.nbytes <= self.closure_budget:
                self.closures.append(b)
                self.resolved[images] = True
                self.stats["closure_bytes"] += b.nbytes
            else:
                self.stats["dense_rereads"] += len(images)
        return out

    def fitness(self, w: np.ndarray) -> np.ndarray:
        """P x 2: class-averaged top-5 and top-1 of each individual on these images."""
        count = self.counts(w)
        return np.stack([class_mean(count < k, self.labels, self.num_classes) for k in TOPK], axis=1)


@dataclass
class GAResult:
    weights: np.ndarray  # best individual, normalised to sum 1
    fitness: tuple[float, float]  # its (class top-5, class top-1) on the fitted half
    history: list[dict]  # one record per generation
    evaluations: int


def normalise(w: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1 (ranking is scale-free, so this only makes equal genomes equal); all-zero rows
    become uniform."""
    w = np.clip(np.atleast_2d(np.asarray(w, np.float64)), 0, None)
    s = w.sum(axis=1, keepdims=True)
    return np.where(s > 0, w / np.where(s > 0, s, 1), 1.0 / w.shape[1])


def best_first(f: np.ndarray) -> np.ndarray:
    """Indices of a population ordered best first: top-5, then top-1, then the earlier index."""
    return np.lexsort((np.arange(len(f)), -f[:, 1], -f[:, 0]))


def run_ga(fitness: Callable[[np.ndarray], np.ndarray], n_models: int, *, population: int = 32,
           generations: int = 30, seed: int = 0, elite: int = 2, tournament: int = 3, crossover: float = 0.9,
           mutation: float | None = None, sigma: float = 0.2,
           progress: Callable[[dict], None] | None = None) -> GAResult:
    """A standard generational GA over weight vectors in [0, 1]^M (see `trainer.ensemble.genetic_weights`)."""
    if population < 2 or generations < 0 or not 0 <= elite < population:
        raise ValueError("the GA needs population >= 2, generations >= 0 and 0 <= elite < population")
    rng = np.random.default_rng(seed)
    mutation = 1.0 / n_models if mutation is None else mutation
    cache: dict[bytes, np.ndarray] = {}

    def evaluate(pop: np.ndarray) -> np.ndarray:
        pop = normalise(pop)
        keys = [p.tobytes() for p in pop]
        todo: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in cache:
                todo.setdefault(key, i)
        if todo:
            cache.update(zip(todo, fitness(pop[list(todo.values())])))
        return np.stack([cache[k] for k in keys])

    def pick() -> np.ndarray:  # tournament selection
        entrants = rng.integers(population, size=tournament)
        return pop[entrants[np.argmin(rank[entrants])]]

    pop = rng.random((population, n_models))
    pop[0] = 1.0  # the plain average is in the first generation, so the GA never ends below it
    history = []
    t0 = time.perf_counter()
    fit = evaluate(pop)
    for gen in range(generations + 1):
        if gen:
            order = best_first(fit)
            children = [pop[i].copy() for i in order[:elite]]
            while len(children) < population:
                a, b = pick(), pick()
                child = np.where(rng.random(n_models) < 0.5, a, b) if rng.random() < crossover else a.copy()
                mutate = rng.random(n_models) < mutation
                child[mutate] += rng.normal(0, sigma, int(mutate.sum()))
                children.append(np.clip(child, 0, 1))
            pop = np.stack(children)
            fit = evaluate(pop)
        order = best_first(fit)
        rank = np.empty(population, int)
        rank[order] = np.arange(population)
        record = {"generation": gen, "best_class_top5": float(fit[order[0], 0]),
                  "best_class_top1": float(fit[order[0], 1]), "mean_class_top5": float(fit[:, 0].mean()),
                  "evaluations": len(cache), "seconds": time.perf_counter() - t0}
        history.append(record)
        if progress is not None:
            progress(record)
    best = order[0]
    return GAResult(normalise(pop[best])[0], (float(fit[best, 0]), float(fit[best, 1])), history, len(cache))
