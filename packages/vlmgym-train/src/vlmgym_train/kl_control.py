"""The KL coefficient of a run: fixed (`--kl_coef`), or steered toward a target KL.

With `--kl_target T` the coefficient beta is a controller (the original project's latest
trainer): after each step it reads the step's measured KL to the reference policy, k, and

    beta <- beta * 1.5^2   when k > max(0.5, 5 T)
    beta <- beta * 1.5     when 2 T < k <= max(0.5, 5 T)
    beta <- beta / 1.5     when k < T / 2
    beta <- beta           otherwise
    beta <- clip(beta, 1e-5, 0.5)

The next step's updates use the new beta. k is the step's `kl/ref` metric: the token mean of
the configured `--kl_estimator` (k3 by default, exp(d) - d - 1 with d = log pi_ref - log
pi_theta) over the completions, under the params of each update, averaged over the step's
updates; the same number the logs show. A step whose KL is not finite leaves beta alone.
The controller's beta is saved with every checkpoint and restored by `--resume`.
"""

from __future__ import annotations

import dataclasses
import math

KL_FACTOR = 1.5
KL_COEF_MIN = 1e-5
KL_COEF_MAX = 0.5
# the starting coefficient when --kl_target is given without --kl_coef (GRPO's beta)
KL_TARGET_START = 0.04


def adapt_kl_coef(coef: float, kl: float, target: float) -> float:
    """One controller update: the coefficient after a step that measured `kl`."""
    if not math.isfinite(kl):
        return coef
    if kl > max(0.5, 5.0 * target):
        coef *= KL_FACTOR**2
    elif kl > 2.0 * target:
        coef *= KL_FACTOR
    elif kl < 0.5 * target:
        coef /= KL_FACTOR
    return min(max(coef, KL_COEF_MIN), KL_COEF_MAX)


@dataclasses.dataclass
class KLController:
    """The run's KL coefficient; `target` None keeps it fixed."""

    coef: float
    target: float | None = None

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float) -> float:
        """Read a step's measured KL; returns the coefficient for the next step."""
        if self.target is not None:
            self.coef = adapt_kl_coef(self.coef, kl, self.target)
        return self.coef
