"""The compiler decides: ``--budget``, ``-O2/-O3/-Os`` and ``slimc explore``.

* :mod:`.budget` parses ``--budget size=..,latency=..,params=..`` and names the ``-O`` levels.
* :mod:`.space` lists each layer's choices (precision, low-rank rank, both) with their measured
  damage and their cost in bytes, parameters and target latency (the cost model's roofline).
* :mod:`.solver` picks one choice per layer: a multiple-choice knapsack on the first budget,
  Lagrange multipliers for the others.
* :mod:`.search` builds the chosen candidate (a clone of the IR through the real passes),
  measures the task metric (or a proxy on calibration data), and backs off the most damaging
  choices until the budget and ``--max-drop`` hold.
* :mod:`.explore` sweeps budgets into a Pareto front (JSON + PNG, each point with its recipe).

The algorithm and why it was chosen: docs/budget.md.
"""
