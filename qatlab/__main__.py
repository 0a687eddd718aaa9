"""`python -m qatlab [overrides]`: compose conf/ with Hydra and run one experiment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qatlab.errors import Interrupted, QatlabError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def user_error(exc: BaseException) -> QatlabError | None:
    """The QatlabError behind exc (Hydra wraps errors raised inside instantiate), if any."""
    while exc is not None:
        if isinstance(exc, QatlabError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    from qatlab.train import train  # heavy imports after Hydra parsed the command line

    try:
        results = train(cfg)
    except Exception as exc:  # noqa: BLE001 - turn known user errors into one clear line
        interrupted = user_error(exc)
        if isinstance(interrupted, Interrupted):  # SIGINT/SIGTERM: stop (a sweep too), say how to resume
            print(f"qatlab: {interrupted}", file=sys.stderr)
            raise SystemExit(interrupted.exit_code) from None
        if in_multirun() and cfg.get("sweep_continue_on_error", True):
            return record_failed_job(exc, cfg)
        err = user_error(exc)
        if err is None:
            raise
        print(f"qatlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return results.get("test/ppl_student")  # the value a Hydra sweeper would minimize


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(exc: BaseException, cfg: DictConfig) -> None:
    """A sweep job failed: log it with its traceback, add a failed row to the results store, go on."""
    import logging
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from qatlab.results import append_row, failed_row

    overrides = " ".join(HydraConfig.get().overrides.task)
    logging.getLogger("qatlab").error("sweep job failed (%s):\n%s", overrides, traceback.format_exc())
    print(f"qatlab: job failed, sweep continues: {user_error(exc) or exc}", file=sys.stderr)
    if cfg.get("results_file") and not getattr(user_error(exc), "recorded", False):  # RunFailed wrote its row
        append_row(cfg.results_file, failed_row(user_error(exc) or exc, task_name=cfg.get("task_name"),
                                                overrides=overrides, output_dir=str(cfg.paths.output_dir)))
    return None


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run()


if __name__ == "__main__":
    main()
