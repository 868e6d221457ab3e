"""The GPU check's data: a tiny synthetic world and a teacher cache of it (random demo teacher), in one folder.

Made where the full install is (spconv for the teacher, the devkit for the world's class ranges); the GPU check
then needs neither: ``python scripts/gpu_fixture.py DIR`` here, carry DIR, ``TIGBEV_GPU_FIXTURE=DIR
scripts/gpu_check.sh`` there. A folder that is complete is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SCENES, SAMPLES_PER_SCENE, VAL_SCENES = 3, 4, 1


def make_fixture(out: Path) -> Path:
    """Write (or reuse) ``out/dataroot``, ``out/teacher.pt``, ``out/cache`` and ``out/fixture.json``."""
    import torch

    from tigbev.config import ExtractTeacherConfig, SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset
    from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint
    from tigbev.stages import extract_teacher

    marker = out / "fixture.json"
    if marker.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_synthetic_dataset(SynthConfig(out_dir=out / "dataroot", scenes=SCENES, samples_per_scene=SAMPLES_PER_SCENE,
                                        val_scenes=VAL_SCENES, seed=11, image_width=192, image_height=108,
                                        lidar_azimuth_steps=720, sweeps_per_sample=1, workers=1), progress=False)
    torch.manual_seed(0)
    tcfg = teacher_preset("demo")
    save_checkpoint(out / "teacher.pt", {"model": CenterPoint(tcfg).state_dict(), "teacher_config": tcfg.to_dict()})
    extract_teacher.run(ExtractTeacherConfig(teacher_checkpoint=out / "teacher.pt", dataroot=out / "dataroot",
                                             split="synth_train", out_dir=str(out / "cache"), workers=0, device="cpu",
                                             shard_samples=4, batch_size=2), progress=False)
    marker.write_text(json.dumps({"dataroot": "dataroot", "split": "synth_train", "cache": "cache",
                                  "teacher": "teacher.pt (seeded random demo teacher)"}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    print(make_fixture(parser.parse_args().out))


if __name__ == "__main__":
    main()
