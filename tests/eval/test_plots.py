"""Report pictures are drawn outside pyplot, so a caller's matplotlib backend is left alone."""

import matplotlib
import numpy as np

from align_jax.eval import plots
from align_jax.methods import sami_report


def test_report_plots_keep_the_callers_backend(tmp_path):
    """A notebook's inline backend once turned into Agg after the first report plot, and its
    own plt.show() then showed nothing (the SAMI, squad and own-document notebooks)."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a non-Agg backend that needs no display, standing in for inline
    try:
        matrix = {"names": ["a", "b"], "win_rate": [[np.nan, 0.7], [0.3, np.nan]],
                  "ci_low": [[np.nan, 0.5], [0.1, np.nan]],
                  "ci_high": [[np.nan, 0.9], [0.5, np.nan]]}
        path = plots.plot_win_rates(str(tmp_path / "w.png"), matrix, judge="j")
        rows = [{"iteration": i, "mi_bound": 0.1 * i, "mi_bound_stderr": 0.01} for i in range(2)]
        sami_report.plot({"iterations": rows}, str(tmp_path / "s.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for png in (path, tmp_path / "s.png"):
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
