"""The bound for "trained the same" across process counts, meshes or devices.

Two runs that differ only in how the devices split the work sum the same float32 terms in
another order, so every gradient entry differs by rounding: at most about n * u * sum|terms|
(u = 2**-24 ~ 6e-8, n the terms in a reduction), a relative 1e-5 at the very most for the tiny
models of the tests (n <= ~1e3 terms per reduction, a few reductions deep).

Adam turns a gradient into about lr * g / (|g| + eps) per coordinate. With the default
eps = 1e-8 a coordinate whose gradient is a cancellation near zero can flip its sign under
rounding and move by up to 2 * lr: no small bound holds on one CPU and the next (1 of 106,816
parameters differed by 1.3e-6 on an AMD EPYC under a 1e-6 bound). With eps = ADAM_EPS the step
is Lipschitz in g (slope lr / eps), so a rounding error |dg| <= 1e-5 * |g|max moves a
coordinate by at most lr * 1e-5 * |g|max / eps per step: below lr / 10 for gradients up to
1e3 (the tiny models' are < 10). Hence `trained_params_atol` = lr * num_steps / 10.

A real bug (a process training on other batches, a missing all-reduce, a wrong mesh axis)
moves nearly every coordinate by about lr per step, ten times past the bound.
"""

ADAM_EPS = 1e-4


def trained_params_atol(*, learning_rate: float, num_steps: int) -> float:
    """The absolute bound on a parameter's difference between two such runs (see above)."""
    return learning_rate * num_steps / 10
