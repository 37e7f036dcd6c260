"""Run ``train_loop`` in this process, or under ``accelerate launch`` when ``settings.num_processes`` > 1.

The flows call :func:`run_training` with the arguments of :func:`flexkd.train.train_loop`. With one process
it is ``train_loop`` itself. With N processes the arguments (models, loss closure, data, callbacks) are
serialised with cloudpickle into a job file under ``work_dir``; ``accelerate launch`` starts N ranks of
``python -m flexkd.launch JOB RESULT`` (torchrun underneath: ``--multi_gpu`` is accelerate's name for it,
and on a host without CUDA the ranks use CPU and gloo); each rank loads the job and runs ``train_loop``, which
wraps, shards and reduces (see :class:`flexkd.distributed.Ranks`). Rank 0 logs, writes the checkpoints and the result;
this process waits, then loads the kept weights into its own ``model`` (and ``extra``), so that the caller
continues exactly as after a one-process run.

MLflow: the flows pass ``log=tracking.log_metrics``, which logs to this process's active run; for the ranks it
becomes a logger bound to that run's id, and the tracking URI travels in ``MLFLOW_TRACKING_URI``.
Threads: each rank gets ``OMP_NUM_THREADS`` = cores / N unless it is set already.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from flexkd.errors import FlexKDError
from flexkd.provenance import atomic_write_text, recover_dir
from flexkd.train import CHECKPOINT, Interrupted, TrainResult, TrainState, load_weights, train_loop


class LaunchError(FlexKDError):
    """The ranks of a multi-process training failed (their output above says why)."""


def run_training(**kwargs) -> TrainResult:
    """``train_loop(**kwargs)``, in this process or in ``settings.num_processes`` ranks."""
    settings = kwargs["settings"]
    # a run killed between the two renames of a checkpoint write: restore the previous one before any rank looks
    recover_dir(Path(kwargs["work_dir"]) / CHECKPOINT)
    if settings.num_processes == 1:
        return train_loop(**kwargs)
    return _launch(**kwargs)


def launch_command(num_processes: int, job: str | Path, result: str | Path) -> list[str]:
    """The ``accelerate launch`` command line that runs the ranks of one training job."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",  # accelerate's multi-process launcher (torchrun); the ranks pick CPU + gloo without CUDA
        "--num_processes", str(num_processes), "--num_machines", "1", "--machine_rank", "0",
        "--main_process_port", "0",  # a free port: several trainings may run side by side
        # precision and compilation are train_loop's own (flexkd.runtime: autocast, grad scaler, torch.compile)
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "flexkd.launch", str(job), str(result),
    ]


def launch_env(num_processes: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: this one, plus threads per rank, the MLflow store and an import path."""
    env = dict(os.environ if base is None else base)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // num_processes)))
    if "mlflow" in sys.modules and not env.get("MLFLOW_TRACKING_URI"):
        import mlflow

        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    root = str(Path(__file__).resolve().parents[1])  # flexkd's checkout, and the flows next to it
    paths = [root, os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _portable_log(log):
    """A log callback usable from another process: ``tracking.log_metrics`` (which logs to this process's
    active MLflow run) becomes one bound to that run's id; any other callback is sent as it is."""
    if log is None or "flexkd.tracking" not in sys.modules:
        return log
    from flexkd import tracking

    if log is tracking.log_metrics:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            return functools.partial(tracking.log_metrics_to_run, run.info.run_id)
    return log


# transformers internals. A model sent to the ranks needs two process-global objects of
# transformers.utils.output_capturing (transformers 5.24.0, pinned in pyproject.toml), and no public API gives
# either (checked: the output-capturing module exports none, and PreTrainedModel has no method that registers):
# - ``_active_collector``: the ContextVar that the forward hooks capturing hidden states write to. A model that
#   ran with output_hidden_states=True holds those hooks, closures over it; cloudpickle would copy it by value
#   (a ContextVar cannot be pickled, and a copy is not the one the rank's forward sets), so it goes by reference.
# - ``_CAN_RECORD_REGISTRY``: what each model class records (``_can_record_outputs``), filled in
#   ``PreTrainedModel.__init__``, which unpickling does not run: unregistered, a rank's model returns no hidden
#   states. tests/unit/test_distributed.py fails if either changes: a model pickled by dump_job must return the
#   same hidden states in a fresh process. These two functions are the only places that touch them.

def _output_collector():
    """transformers' process-global collector of hidden states (what its forward hooks write to)."""
    from transformers.utils import output_capturing

    return output_capturing._active_collector


def _restore_module(module, state: dict) -> None:
    """Unpickle a transformers model and register its class's output recording, as ``__init__`` would."""
    from transformers.utils import output_capturing

    module.__setstate__(state)
    output_capturing._CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def dump_job(job: dict, handle) -> None:
    """cloudpickle the training arguments (closures and lambdas included), with two fixes for transformers
    models: the forward hooks that capture hidden states refer to a process-global ContextVar, which is sent by
    reference (the rank's own), and each model re-registers its output recording when unpickled (see above)."""
    import cloudpickle
    from transformers import PreTrainedModel

    collector = _output_collector()

    class JobPickler(cloudpickle.Pickler):
        def reducer_override(self, obj):
            if obj is collector:
                return _output_collector, ()
            if isinstance(obj, PreTrainedModel):
                reduced = obj.__reduce_ex__(5)
                if len(reduced) >= 3 and reduced[2] is not None:
                    return (*reduced[:2], reduced[2], None, None, _restore_module)
            return super().reducer_override(obj)

    JobPickler(handle, protocol=5).dump(job)


def _launch(**kwargs) -> TrainResult:
    import torch

    settings, model, extra = kwargs["settings"], kwargs["model"], kwargs.get("extra")
    work_dir = Path(kwargs["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".launch-", dir=work_dir))  # next to the checkpoints: room for the models
    try:
        job, result_path = scratch / "job.pkl", scratch / "result.json"
        with open(job, "wb") as handle:
            dump_job({**kwargs, "log": _portable_log(kwargs.get("log"))}, handle)
        command = launch_command(settings.num_processes, job, result_path)
        completed = subprocess.run(command, env=launch_env(settings.num_processes), check=False)
        if completed.returncode != 0 or not result_path.exists():
            raise LaunchError(
                f"{kwargs.get('desc', 'train')}: the {settings.num_processes} training processes failed "
                f"(exit status {completed.returncode}; their output is above). Command: {' '.join(command)}"
            )
        outcome = json.loads(result_path.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "interrupted" in outcome:
        raise Interrupted(outcome["interrupted"])
    # Leave model (and extra) as a one-process train_loop would: the kept weights, the last extra.
    model_dir = Path(outcome["model_dir"])
    load_weights(model, model_dir)
    if extra is not None:
        blob = torch.load(work_dir / CHECKPOINT / "trainer_state.pt", map_location="cpu", weights_only=True)
        if blob["extra"] is not None:
            extra.load_state_dict(blob["extra"])
    return TrainResult(state=TrainState(**outcome["state"]), model_dir=model_dir,
                       total_steps=outcome["total_steps"], resumed_from=outcome["resumed_from"])


def main(argv: list[str] | None = None) -> None:
    """One rank: load the job, run train_loop, and (rank 0) write the result."""
    job_path, result_path = (argv if argv is not None else sys.argv[1:])
    import cloudpickle
    import torch
    from accelerate import PartialState

    with open(job_path, "rb") as handle:
        job = cloudpickle.load(handle)
    runtime = job.get("runtime")
    on_cuda = runtime is not None and runtime.device.type == "cuda"
    state = PartialState(cpu=not on_cuda)
    if on_cuda:  # the runtime was resolved in the launching process: each rank runs on its own GPU
        import dataclasses

        job["runtime"] = dataclasses.replace(runtime, device=torch.device("cuda", state.local_process_index))
        torch.cuda.set_device(job["runtime"].device)
    try:
        result = train_loop(**job)
        outcome = {"state": asdict(result.state), "model_dir": str(result.model_dir),
                   "total_steps": result.total_steps, "resumed_from": result.resumed_from}
    except Interrupted as err:
        outcome = {"interrupted": str(err)}
    if state.is_main_process:
        atomic_write_text(result_path, json.dumps(outcome))
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
