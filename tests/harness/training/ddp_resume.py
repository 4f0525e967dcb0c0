"""Run under ``torchrun`` by test_ddp.py: one uninterrupted run and one interrupted at step 2
and resumed, both with the same config, in one process group.

    python -m torch.distributed.run --nproc_per_node=2 ddp_resume.py OUT KEY=VALUE...
"""

import sys
from pathlib import Path

from mtseg_harness.runs import build_trainer, load_config
from mtseg_harness.training import distributed


def main(out: Path, settings: list[str]) -> None:
    build_trainer(load_config(None, settings + [f"train.out_dir={out / 'full'}"])).fit()
    build_trainer(load_config(None, settings + [f"train.out_dir={out / 'part'}"])).fit(stop_at=2)
    resumed = build_trainer(load_config(None, settings + [f"train.out_dir={out / 'part'}", "train.resume=true"]))
    assert resumed.step == 2, resumed.step
    resumed.fit()
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
