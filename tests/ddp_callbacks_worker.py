"""The Trainer and Lightning callbacks on two CPU processes (DDP over gloo).

Started by ``tests/test_integrations.py::test_callbacks_ddp_under_accelerate_launch`` as
``accelerate launch --multi_gpu --num_processes 2 tests/ddp_callbacks_worker.py OUT``; each process
writes its callbacks' histories (the Trainer's scenarios, then Lightning's DDP strategy) to
``OUT/<rank>.json``. The model and data are float64 (``torch.set_default_dtype``), as in the
single-process references the test runs.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from noisescale.integrations.transformers import NoiseScaleCallback
from test_integrations import (
    DDP_SCENARIOS,
    _gpt2_lm,
    _hf_args,
    _HFDataset,
    _HFModel,
    _lit_model,
    _loader,
    _Padded,
    _token_loss_trainer,
)


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
    for name, override in (("override", True), ("own_loss", False)):
        results[name] = _token_loss(out / name, override)
    results["lightning"] = {"history": _lightning(out / "lightning")}
    rank = torch.distributed.get_rank()
    (out / f"{rank}.json").write_text(json.dumps(results))
    # an orderly end: a process group left to interpreter shutdown can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _token_loss(out: Path, override: bool) -> list[dict]:
    """GPT-2 over padded sequences, 2 steps of 2 sequences per process: the documented
    compute_loss override over tokens (loss_reduction='num_items_in_batch'), or the model's
    own loss (labels=, measured)."""
    import transformers

    kw = {"loss_reduction": "num_items_in_batch"} if override else {}
    callback = NoiseScaleCallback(sync_every=1, per_example_fraction=1.0, microbatch=False, **kw)
    args = _hf_args(
        out, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=2,
        learning_rate=0.0, max_grad_norm=0.0,
    )  # fmt: skip
    trainer_cls = _token_loss_trainer() if override else transformers.Trainer
    trainer = trainer_cls(
        model=_gpt2_lm(), args=args, train_dataset=_Padded(), callbacks=[callback]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return callback.tracker.history


def _lightning(out: Path) -> list[dict]:
    """Lightning's DDP strategy in the same processes (it finds torchrun's environment and the
    process group accelerate started): one micro-batch of 8 per process and step."""
    import lightning.pytorch as pl

    from noisescale.integrations.lightning import NoiseScaleCallback as LightningCallback

    callback = LightningCallback(
        sync_every=1, log_every=0, per_example_fraction=1.0, history_path=out / "history.jsonl"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_lit_model(), _loader())
    return callback.tracker.history


if __name__ == "__main__":
    main(Path(sys.argv[1]))
