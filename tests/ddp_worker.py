"""Worker for tests/test_training_ddp.py: run under torch.distributed.run with 2 CPU processes."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_training_loop import make_batches
from tsm_trainer.core.file_format import save_file_atomic
from tsm_trainer.core.intervals import expert_index
from tsm_trainer.families import get_training_family
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.loop import Trainer


def main(base: str, out: str) -> None:
    torch.set_num_threads(1)
    config = TrainConfig(
        pretrained_model_name_or_path=base,
        dataset_config="unused",
        output_dir=out,
        learning_rate=1e-2,
        max_train_steps=2,
        family="sd1",
        tsm_scales="8",
        save_every_n_steps=0,
    )
    family = get_training_family("sd1")
    trainer = Trainer(
        config,
        family,
        family.load(base),
        lambda e: ({**b, "pixels": b["pixels"][:1], "captions": b["captions"][:1]} for b in make_batches(e)),
        batch_size=1,
        log=lambda s: None,
    )
    rank = trainer.accelerator.process_index
    init = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    used = set()
    original = trainer._loss

    def spy(batch, timesteps, g):  # record which experts this process trained
        used.update(expert_index(timesteps, 8).tolist())
        return original(batch, timesteps, g)

    trainer._loss = spy
    trainer.run()
    state = trainer.network.state_dict()
    save_file_atomic(
        {**{f"init.{k}": v for k, v in init.items()}, **{f"final.{k}": v for k, v in state.items()}},
        os.path.join(out, f"rank{rank}.safetensors"),
        add_hashes=False,
    )
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(sorted(used), f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
