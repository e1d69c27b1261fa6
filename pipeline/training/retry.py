"""Ray Train V2 retries every worker-group error up to `train.max_failures`; this callback stops the run at the
first one that a retry cannot fix (pipeline.training.errors), and leaves worker and node losses to the retries.

How (Ray 2.x Train V2, ray/train/v2/_internal): the controller polls the worker group; `WorkerGroup.poll_status`
calls every worker-group callback, the UserCallbackHandler among them, which calls `UserCallback.after_exception`
with {rank: the worker's own exception} whenever a worker failed. That runs before the controller hands the
WorkerGroupError to its failure policy (the retry). An exception raised from the hook leaves `poll_status`
and the controller's step; the control loop wraps it in a ControllerError, and the default failure policy
retries a ControllerError only for a worker-group start-up failure: the run shuts its workers down and
`trainer.fit()` raises ControllerError(controller_failure=<the raised exception>). The hook raises the worker's
exception itself: it crossed to the controller pickled once already, so it pickles to the driver again (a
wrapper would lose it, as pickling drops `__cause__`). The failure policy's own interface is not public
(trainer.fit builds DefaultFailurePolicy), hence a callback.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2.api.callback import UserCallback

from pipeline.training.errors import deterministic_cause


class StopOnDeterministicFailure(UserCallback):
    """Runs in Ray Train's controller process; stateless, so it pickles there with the run config."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            cause = deterministic_cause(worker_exceptions[rank])
            if cause is not None:
                raise cause
