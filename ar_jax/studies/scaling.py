"""Scaling-law fits: the parametric law L(N, D) = E + A/N^alpha + B/D^beta and IsoFLOP profiles.

The parametric fit is Approach 3 of Hoffmann et al. (2022), "Training compute-optimal large
language models", as replicated by Besiroglu et al. (2024), "Chinchilla scaling: a replication
attempt": a Huber loss (delta 1e-3) on log losses, minimised by L-BFGS-B from a grid of starts.
IsoFLOP profiles are their Approach 2. Pure numpy/scipy; their figures are in plots.py.
"""

import dataclasses
import itertools
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import threadpoolctl
from scipy import optimize, special, stats

# Starting grid of Besiroglu et al. (2024): 5 * 5 * 5 * 6 * 6 = 4500 starts.
GRID = {
  'log_A': np.arange(0, 30, 5.0),
  'log_B': np.arange(0, 30, 5.0),
  'log_E': np.arange(-1, 1.5, 0.5),
  'alpha': np.arange(0, 2.5, 0.5),
  'beta': np.arange(0, 2.5, 0.5),
}
_PARAMS = ('log_A', 'log_B', 'log_E', 'alpha', 'beta')


def compute_6nd(n_params, n_tokens):
  """Training compute C = 6ND in FLOPs: the Kaplan et al. / Chinchilla approximation."""
  return 6.0 * np.asarray(n_params, dtype=float) * np.asarray(n_tokens, dtype=float)


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta, for N parameters trained on D tokens."""

  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def predict(self, N, D) -> np.ndarray:
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return self.E + self.A / N**self.alpha + self.B / D**self.beta

  @property
  def a(self) -> float:
    """Exponent of the compute-optimal model size, N* proportional to C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """Exponent of the compute-optimal token count, D* proportional to C^b."""
    return self.alpha / (self.alpha + self.beta)

  def optimal(self, C) -> tuple[np.ndarray, np.ndarray]:
    """(N*, D*) minimising the loss at compute C = 6ND: closed form, eq. (4) of Hoffmann et al."""
    G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    half = np.asarray(C, dtype=float) / 6
    return G * half**self.a, half**self.b / G

  def frontier(self, C) -> np.ndarray:
    """The lowest loss reachable with compute C: the loss at (N*, D*)."""
    return self.predict(*self.optimal(C))


def _positive_1d(name: str, x) -> np.ndarray:
  x = np.asarray(x, dtype=float)
  if x.ndim != 1:
    raise ValueError(f'{name} must be one-dimensional, got shape {x.shape}')
  if not np.all(np.isfinite(x) & (x > 0)):
    raise ValueError(f'{name} must be finite and positive, got {x[~(np.isfinite(x) & (x > 0))]}')
  return x


def _logs(N, D, L, min_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ln N, ln D, ln L, validated: equal lengths and at least min_points."""
  N, D, L = _positive_1d('N', N), _positive_1d('D', D), _positive_1d('L', L)
  if not len(N) == len(D) == len(L):
    raise ValueError(f'N, D and L must have equal lengths, got {len(N)}, {len(D)}, {len(L)}')
  if len(N) < min_points:
    raise ValueError(f'need at least {min_points} runs to fit, got {len(N)}')
  return np.log(N), np.log(D), np.log(L)


def _objective(P, logN, logD, logL, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Summed Huber loss of log L against its prediction, and its gradient: (K,) and (K, 5).

  P is (K, 5) rows of (log A, log B, log E, alpha, beta), so one call scores a whole grid of
  starts. The prediction logsumexp(log A - alpha ln N, log B - beta ln D, log E) is computed
  stably, and its derivatives are the softmax weights of the three terms.
  """
  log_A, log_B, log_E, alpha, beta = (p[:, None] for p in np.asarray(P, dtype=float).T)
  t = np.stack(np.broadcast_arrays(log_A - alpha * logN, log_B - beta * logD, log_E))
  m = t.max(axis=0)
  w = np.exp(t - m)
  total = w.sum(axis=0)
  w /= total
  r = m + np.log(total) - logL
  h = np.clip(r, -delta, delta)  # Huber'(r)
  gw = h * w
  grad = np.stack([gw[0].sum(-1), gw[1].sum(-1), gw[2].sum(-1), -gw[0] @ logN, -gw[1] @ logD], -1)
  return special.huber(delta, r).sum(-1), grad


def _grid_starts(grid: Mapping[str, Sequence[float]]) -> np.ndarray:
  if set(grid) != set(_PARAMS):
    raise ValueError(f'grid must have exactly the keys {_PARAMS}, got {sorted(grid)}')
  return np.array(list(itertools.product(*(grid[k] for k in _PARAMS))), dtype=float)


def _screen(starts: np.ndarray, logs, delta: float, n_starts: int | None) -> np.ndarray:
  """The n_starts starts with the lowest objective (all of them when n_starts is None)."""
  if n_starts is None or n_starts >= len(starts):
    return starts
  if n_starts < 1:
    raise ValueError(f'n_starts must be at least 1 (or None for every start), got {n_starts}')
  f, _ = _objective(starts, *logs, delta)
  return starts[np.argsort(f, kind='stable')[:n_starts]]


def _minimise(starts: np.ndarray, logs, delta: float) -> np.ndarray:
  """L-BFGS-B from each start; the converged result with the lowest objective."""

  def fun(x):
    f, g = _objective(x[None], *logs, delta)
    return f[0], g[0]

  best = None
  # SciPy's L-BFGS-B calls BLAS on tiny matrices; OpenBLAS's idle threads then spin beside this
  # serial loop, doubling its CPU time and slowing it severalfold on a busy machine.
  with threadpoolctl.threadpool_limits(limits=1, user_api='blas'):
    for x0 in starts:
      res = optimize.minimize(fun, x0, jac=True, method='L-BFGS-B')
      if res.success and (best is None or res.fun < best.fun):
        best = res
  if best is None:
    raise RuntimeError(f'L-BFGS-B converged from none of {len(starts)} starts')
  return best.x


def _law(x: np.ndarray) -> Law:
  log_A, log_B, log_E, alpha, beta = x
  return Law(
    E=float(np.exp(log_E)),
    A=float(np.exp(log_A)),
    B=float(np.exp(log_B)),
    alpha=float(alpha),
    beta=float(beta),
  )


def fit_law(
  N,
  D,
  L,
  *,
  delta: float = 1e-3,
  grid: Mapping[str, Sequence[float]] = GRID,
  n_starts: int | None = 64,
) -> Law:
  """Fits L(N, D) to runs of N parameters trained on D tokens reaching loss L (Approach 3).

  The objective is the sum, not the mean, of the Huber losses, as in Besiroglu et al.: L-BFGS-B's
  gradient tolerance is absolute, and the mean's smaller gradient stops it early (on Chinchilla's
  data at B = 685 instead of 2144). L-BFGS-B from all 4500 grid starts is slow, so the grid
  is scored in one vectorised pass and L-BFGS-B runs from the n_starts best (None runs all);
  on Chinchilla's data the best start reaches the all-starts optimum.
  """
  logs = _logs(N, D, L, min_points=len(_PARAMS))
  return _law(_minimise(_screen(_grid_starts(grid), logs, delta, n_starts), logs, delta))


@dataclasses.dataclass(frozen=True)
class Fit:
  """A law fitted to all runs, and the same fit to bootstrap resamples of the runs."""

  law: Law
  # E, A, B, alpha, beta and the compute-optimal exponents a, b: one value per resample.
  samples: dict[str, np.ndarray]

  def stderr(self) -> dict[str, float]:
    """Standard deviation of each estimate over the resamples."""
    return {k: float(np.std(v, ddof=1)) for k, v in self.samples.items()}

  def interval(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval holding the given fraction of the resampled estimates."""
    if not 0 < level < 1:
      raise ValueError(f'level must be in (0, 1), got {level}')
    q = 50 * (1 - level), 50 * (1 + level)
    return {k: tuple(float(p) for p in np.percentile(v, q)) for k, v in self.samples.items()}

  def identified(self, level: float = 0.95) -> dict[str, bool]:
    """Whether the runs pin each estimate down: the scales E, A and B (fitted in log space)
    when their interval spans less than a factor of 100, the exponents when it is narrower
    than twice the estimate. An E that runs off to 0 (1e-60, interval from 1e-276) means the
    runs cannot tell the irreducible loss from the power-law terms: it is no estimate."""
    out = {}
    for k, (low, high) in self.interval(level).items():
      value = getattr(self.law, k)
      if k in ('E', 'A', 'B'):
        out[k] = bool(low > 0 and high / low < 100 and value > 1e-12)
      else:
        out[k] = bool(high - low < 2 * abs(value))
    return out


def bootstrap(
  N,
  D,
  L,
  *,
  n_boot: int = 200,
  seed: int = 0,
  delta: float = 1e-3,
  grid: Mapping[str, Sequence[float]] = GRID,
  n_starts: int | None = 64,
  boot_starts: int = 4,
) -> Fit:
  """fit_law on all runs, then refit n_boot resamples of the runs drawn with replacement.

  A refit starts from the full-data optimum and from the boot_starts best grid starts, rather
  than from the whole grid: a resample's optimum lies near the full data's, and the grid starts
  guard against the odd resample whose optimum moves to another basin.
  """
  if n_boot < 2:
    raise ValueError(f'n_boot must be at least 2 for a standard error, got {n_boot}')
  logs = _logs(N, D, L, min_points=len(_PARAMS))
  screened = _screen(_grid_starts(grid), logs, delta, n_starts)
  best = _minimise(screened, logs, delta)
  starts = np.vstack([best, screened[:boot_starts]])
  rng = np.random.default_rng(seed)
  laws = []
  for _ in range(n_boot):
    i = rng.integers(len(logs[0]), size=len(logs[0]))
    laws.append(_law(_minimise(starts, tuple(x[i] for x in logs), delta)))
  names = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')
  samples = {k: np.array([getattr(law, k) for law in laws]) for k in names}
  return Fit(law=_law(best), samples=samples)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = k * C^exponent fitted by least squares in log-log, with OLS standard errors."""

  k: float
  exponent: float
  exponent_stderr: float
  dof: int

  def __call__(self, C) -> np.ndarray:
    return self.k * np.asarray(C, dtype=float) ** self.exponent

  def interval(self, level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the exponent."""
    if not 0 < level < 1:
      raise ValueError(f'level must be in (0, 1), got {level}')
    half = float(stats.t.ppf((1 + level) / 2, self.dof)) * self.exponent_stderr
    return self.exponent - half, self.exponent + half


def _power_law(C: np.ndarray, y: np.ndarray) -> PowerLaw:
  fit = stats.linregress(np.log(C), np.log(y))
  return PowerLaw(float(np.exp(fit.intercept)), float(fit.slope), float(fit.stderr), len(C) - 2)


@dataclasses.dataclass(frozen=True)
class Budget:
  """One IsoFLOP profile: the runs at one compute budget and the parabola through them."""

  C: float  # geometric mean of the runs' compute
  N: np.ndarray
  L: np.ndarray
  coeffs: np.ndarray  # L = c0 (ln N)^2 + c1 ln N + c2
  N_opt: float  # nan when the parabola has no minimum (c0 <= 0)
  D_opt: float
  L_opt: float
  # The vertex lies outside the sampled sizes: N_opt is an extrapolation, and a sign that the
  # budget's sizes should move towards it.
  extrapolated: bool

  @property
  def has_minimum(self) -> bool:
    return bool(self.coeffs[0] > 0)


@dataclasses.dataclass(frozen=True)
class IsoFlops:
  """The profiles, lowest compute first, and the compute-optimal N* and D* against C."""

  budgets: tuple[Budget, ...]
  n_law: PowerLaw  # N* = k C^a
  d_law: PowerLaw  # D* = k' C^b


def _group(C: np.ndarray, budget, rtol: float) -> list[np.ndarray]:
  """Indices of the runs at each compute budget, from labels or by relative closeness of C."""
  if budget is not None:
    budget = np.asarray(budget)
    if budget.shape != C.shape:
      raise ValueError(f'budget must have one label per run ({C.shape}), got shape {budget.shape}')
    return [np.flatnonzero(budget == label) for label in np.unique(budget)]
  order = np.argsort(C)
  groups = [[order[0]]]
  for i in order[1:]:
    if C[i] > C[groups[-1][0]] * (1 + rtol):
      groups.append([])
    groups[-1].append(i)
  return [np.array(g) for g in groups]


def _budget(N: np.ndarray, C: np.ndarray, L: np.ndarray) -> Budget:
  C_mean = float(np.exp(np.log(C).mean()))
  if len(np.unique(N)) < 3:
    raise ValueError(
      f'the budget at C={C_mean:.3g} has model sizes {np.unique(N)}: a parabola needs at least 3'
    )
  x = np.log(N)
  coeffs = np.polyfit(x, L, 2)
  x_opt = -coeffs[1] / (2 * coeffs[0]) if coeffs[0] > 0 else np.nan
  extrapolated = bool(coeffs[0] > 0 and not x.min() <= x_opt <= x.max())
  N_opt = float(np.exp(x_opt))
  return Budget(
    C=C_mean,
    N=N,
    L=L,
    coeffs=coeffs,
    N_opt=N_opt,
    D_opt=C_mean / (6 * N_opt),
    L_opt=float(np.polyval(coeffs, x_opt)),
    extrapolated=extrapolated,
  )


def isoflops(N, C, L, *, budget=None, rtol: float = 0.1) -> IsoFlops:
  """IsoFLOP profiles (Approach 2): per budget the loss-minimising N*, then N*, D* against C.

  Runs belong to one budget when they share a label in budget (one per run) or, without labels,
  when their compute lies within a relative rtol of the budget's smallest. A budget whose loss
  is not convex in log N (all its sizes on one side of the optimum, or noise) has no vertex:
  it is kept, with a warning, and left out of the power laws. The power laws' intervals are
  OLS standard errors of the log-log slope: with a handful of budgets these are wide, and they
  count the scatter of the N* about the line but not the error of each vertex.
  """
  N, C, L = _positive_1d('N', N), _positive_1d('C', C), _positive_1d('L', L)
  if not len(N) == len(C) == len(L):
    raise ValueError(f'N, C and L must have equal lengths, got {len(N)}, {len(C)}, {len(L)}')
  budgets = sorted((_budget(N[i], C[i], L[i]) for i in _group(C, budget, rtol)), key=lambda b: b.C)
  for b in budgets:
    if not b.has_minimum:
      warnings.warn(
        f'the budget at C={b.C:.3g} has loss concave in log N (curvature {b.coeffs[0]:.3g}): '
        'no minimum, left out of the power laws (sizes all on one side of the optimum?)',
        stacklevel=2,
      )
    elif b.extrapolated:
      warnings.warn(
        f'the budget at C={b.C:.3g} has its optimum N*={b.N_opt:.3g} outside its sampled sizes '
        f'[{b.N.min():.3g}, {b.N.max():.3g}]: an extrapolated vertex',
        stacklevel=2,
      )
  fitted = [b for b in budgets if b.has_minimum]
  if len(fitted) < 3:
    raise ValueError(
      f'need at least 3 compute budgets with a loss minimum for a power law with errors, got '
      f'{len(fitted)} of {len(budgets)}'
    )
  Cs = np.array([b.C for b in fitted])
  return IsoFlops(
    budgets=tuple(budgets),
    n_law=_power_law(Cs, np.array([b.N_opt for b in fitted])),
    d_law=_power_law(Cs, np.array([b.D_opt for b in fitted])),
  )
