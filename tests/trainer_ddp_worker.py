"""The Hugging Face Trainer with NoiseScaleCallback on two CPU processes (DDP over gloo).

Started by ``tests/test_integrations.py::test_transformers_ddp_under_accelerate_launch`` as
``accelerate launch --multi_gpu --num_processes 2 tests/trainer_ddp_worker.py OUT``; each process
writes its callback's history for each scenario to ``OUT/<rank>.json``. The model and data are
float64 (``torch.set_default_dtype``), as in the single-process reference the test runs.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from noisescale.integrations.transformers import NoiseScaleCallback
from test_integrations import DDP_SCENARIOS, _hf_args, _HFDataset, _HFModel


def main(out: Path) -> None:
    import transformers

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    results = {}
    for name, accumulation in DDP_SCENARIOS.items():
        callback = NoiseScaleCallback(
            sync_every=1, per_example_fraction=1.0, history_path=out / name / "history.jsonl"
        )
        args = _hf_args(out / name, gradient_accumulation_steps=accumulation)
        trainer = transformers.Trainer(
            model=_HFModel(), args=args, train_dataset=_HFDataset(), callbacks=[callback]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        results[name] = {
            "world_size": torch.distributed.get_world_size(),
            "backend": str(torch.distributed.get_backend()),
            "model": type(trainer.model_wrapped).__name__,
            "history": callback.tracker.history,
        }
    rank = torch.distributed.get_rank()
    (out / f"{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
