"""The ``tigbev`` command line: each command parses its options, builds a config and calls one stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tigbev.errors import TigbevError

app = typer.Typer(
    name="tigbev",
    help="TiG-BEV LiDAR-to-camera distillation with an offline teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """TiG-BEV LiDAR-to-camera distillation with an offline teacher cache."""


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Dataroot to create (must not exist, or be empty).")],
    scenes: Annotated[int, typer.Option(min=1, help="Number of scenes.")] = 12,
    samples_per_scene: Annotated[int, typer.Option(min=2, help="Key frames per scene (2 Hz).")] = 10,
    val_scenes: Annotated[
        int | None, typer.Option(min=0, help="Scenes in the synth_val split (the last ones); default: a sixth.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the output is a deterministic function of it.")] = 0,
    image_width: Annotated[int, typer.Option(help="Camera image width (px).")] = 480,
    image_height: Annotated[int, typer.Option(help="Camera image height (px).")] = 270,
    sweeps_per_sample: Annotated[int, typer.Option(min=0, help="Non-key LiDAR sweeps between key frames.")] = 2,
    lidar_azimuth_steps: Annotated[int, typer.Option(help="LiDAR horizontal resolution (steps per turn).")] = 1084,
    object_density: Annotated[float, typer.Option(min=0.0, help="Scales the number of extra objects.")] = 1.0,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering scenes in parallel.")] = 2,
) -> None:
    """Write a synthetic nuScenes-format dataroot (splits synth_train and synth_val)."""
    from tigbev.config import SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset

    try:
        cfg = SynthConfig(
            out_dir=out_dir, scenes=scenes, samples_per_scene=samples_per_scene, val_scenes=val_scenes, seed=seed,
            image_width=image_width, image_height=image_height, sweeps_per_sample=sweeps_per_sample,
            lidar_azimuth_steps=lidar_azimuth_steps, object_density=object_density, workers=workers,
        )
        result = write_synthetic_dataset(cfg)
    except (TigbevError, ValueError) as exc:
        raise _fail(exc) from None
    typer.echo(
        f"wrote {result.num_samples} samples ({result.num_annotations} annotations) to {result.dataroot} "
        f"in {result.seconds:.1f} s; version {result.version}, splits {result.train_split} / {result.val_split}"
    )


@app.command("train-teacher")
def train_teacher(
    preset: Annotated[str, typer.Option(help="Model + defaults: 'demo' (CPU-sized) or 'nuscenes' (published).")],
    dataroot: Annotated[Path, typer.Option(exists=True, file_okay=False, help="nuScenes-format dataroot.")],
    split: Annotated[str, typer.Option(help="Training split (predefined or from splits.json).")],
    out: Annotated[Path, typer.Option(help="Run directory (new, or an existing one with --resume).")],
    val_split: Annotated[str | None, typer.Option(help="Evaluate the final model on this split.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default: the preset's).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Samples per step (default: the preset's).")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Peak one-cycle learning rate (default: preset's).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda[:N]'.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    no_augment: Annotated[bool, typer.Option(help="Disable rotation/scale/flip augmentation.")] = False,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps (smoke runs).")] = None,
) -> None:
    """Train the CenterPoint LiDAR teacher; checkpoints, metrics log and loss curve go to OUT."""
    from tigbev.config import TrainTeacherConfig, train_teacher_defaults
    from tigbev.stages import train_teacher as stage

    try:
        defaults = train_teacher_defaults(preset)  # type: ignore[arg-type]
        overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
        cfg = TrainTeacherConfig(
            preset=preset, dataroot=dataroot, split=split, out_dir=out, val_split=val_split, workers=workers,
            seed=seed, device=device, resume=resume, augment=not no_augment, max_steps=max_steps,
            **{**defaults, **overrides},
        )
        result = stage.run(cfg)
    except (TigbevError, ValueError) as exc:
        raise _fail(exc) from None
    typer.echo(f"teacher: {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}, "
               f"checkpoint {result.checkpoint}")
    if result.metrics is not None:
        typer.echo(f"{val_split}: mAP {result.metrics['mAP']:.4f}  NDS {result.metrics['NDS']:.4f}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
